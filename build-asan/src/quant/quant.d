build-asan/src/quant/quant.o: src/quant/quant.c src/quant/quant.h \
 src/gguf/gguf.h
src/quant/quant.h:
src/gguf/gguf.h:
