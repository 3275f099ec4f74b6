build-asan/src/cpu/forward.o: src/cpu/forward.c src/cpu/cpu.h \
 src/engine/backend.h src/model/model.h src/gguf/gguf.h src/quant/quant.h
src/cpu/cpu.h:
src/engine/backend.h:
src/model/model.h:
src/gguf/gguf.h:
src/quant/quant.h:
