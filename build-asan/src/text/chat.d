build-asan/src/text/chat.o: src/text/chat.c src/ds4.h \
 src/text/json_text.h
src/ds4.h:
src/text/json_text.h:
