build-asan/src/quant/quantize.o: src/quant/quantize.c src/quant/quant.h \
 src/gguf/gguf.h
src/quant/quant.h:
src/gguf/gguf.h:
