build-asan/src/text/dsml.o: src/text/dsml.c src/ds4.h \
 src/text/json_text.h
src/ds4.h:
src/text/json_text.h:
