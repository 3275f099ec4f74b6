build-asan/src/quant/iq2_tables.o: src/quant/iq2_tables.c \
 src/quant/quant.h src/gguf/gguf.h
src/quant/quant.h:
src/gguf/gguf.h:
