build-asan/apps/ds4-server/anthropic.o: apps/ds4-server/anthropic.c \
 apps/ds4-server/server.h src/ds4.h
apps/ds4-server/server.h:
src/ds4.h:
