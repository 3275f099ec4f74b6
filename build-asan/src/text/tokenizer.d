build-asan/src/text/tokenizer.o: src/text/tokenizer.c src/ds4.h \
 src/text/pretok.h src/text/tokenizer_internal.h
src/ds4.h:
src/text/pretok.h:
src/text/tokenizer_internal.h:
