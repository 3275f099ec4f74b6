build-asan/src/gguf/gguf_write.o: src/gguf/gguf_write.c src/gguf/gguf.h
src/gguf/gguf.h:
