build-asan/src/model/model.o: src/model/model.c src/model/model.h \
 src/gguf/gguf.h
src/model/model.h:
src/gguf/gguf.h:
