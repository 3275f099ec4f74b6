build-asan/src/text/pretok.o: src/text/pretok.c src/text/pretok.h
src/text/pretok.h:
