build-asan/apps/ds4-server/main.o: apps/ds4-server/main.c \
 apps/ds4-server/server.h src/ds4.h
apps/ds4-server/server.h:
src/ds4.h:
