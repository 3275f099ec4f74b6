build-asan/tests/test_generate: tests/test_generate.c src/ds4.h \
 tests/test.h
src/ds4.h:
tests/test.h:
