build-asan/src/text/json_text.o: src/text/json_text.c \
 src/text/json_text.h
src/text/json_text.h:
