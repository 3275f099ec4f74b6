build-asan/src/engine/session.o: src/engine/session.c src/ds4.h \
 src/engine/engine_internal.h src/engine/backend.h src/model/model.h \
 src/gguf/gguf.h
src/ds4.h:
src/engine/engine_internal.h:
src/engine/backend.h:
src/model/model.h:
src/gguf/gguf.h:
