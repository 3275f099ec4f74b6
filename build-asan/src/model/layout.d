build-asan/src/model/layout.o: src/model/layout.c src/model/model.h \
 src/gguf/gguf.h
src/model/model.h:
src/gguf/gguf.h:
