build-asan/src/text/tokenizer_gguf.o: src/text/tokenizer_gguf.c \
 src/gguf/gguf.h src/text/tokenizer_internal.h src/ds4.h
src/gguf/gguf.h:
src/text/tokenizer_internal.h:
src/ds4.h:
