build-asan/src/cpu/pool.o: src/cpu/pool.c src/cpu/cpu.h \
 src/engine/backend.h src/model/model.h src/gguf/gguf.h
src/cpu/cpu.h:
src/engine/backend.h:
src/model/model.h:
src/gguf/gguf.h:
