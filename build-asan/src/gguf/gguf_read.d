build-asan/src/gguf/gguf_read.o: src/gguf/gguf_read.c src/gguf/gguf.h
src/gguf/gguf.h:
