build-asan/src/cpu/kernels.o: src/cpu/kernels.c src/cpu/cpu.h \
 src/engine/backend.h src/model/model.h src/gguf/gguf.h src/quant/quant.h
src/cpu/cpu.h:
src/engine/backend.h:
src/model/model.h:
src/gguf/gguf.h:
src/quant/quant.h:
