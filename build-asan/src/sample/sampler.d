build-asan/src/sample/sampler.o: src/sample/sampler.c src/ds4.h
src/ds4.h:
