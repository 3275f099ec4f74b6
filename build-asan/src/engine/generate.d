build-asan/src/engine/generate.o: src/engine/generate.c src/ds4.h
src/ds4.h:
