build-asan/src/gguf/gguf_types.o: src/gguf/gguf_types.c src/gguf/gguf.h
src/gguf/gguf.h:
