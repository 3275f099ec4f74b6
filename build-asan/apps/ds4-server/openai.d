build-asan/apps/ds4-server/openai.o: apps/ds4-server/openai.c \
 apps/ds4-server/server.h src/ds4.h
apps/ds4-server/server.h:
src/ds4.h:
