build-asan/src/text/tokenizer_json.o: src/text/tokenizer_json.c \
 src/text/tokenizer_internal.h src/ds4.h
src/text/tokenizer_internal.h:
src/ds4.h:
