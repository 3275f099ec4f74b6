build-asan/src/model/hparams.o: src/model/hparams.c src/model/model.h \
 src/gguf/gguf.h
src/model/model.h:
src/gguf/gguf.h:
