build-asan/apps/ds4-server/worker.o: apps/ds4-server/worker.c \
 apps/ds4-server/server.h src/ds4.h
apps/ds4-server/server.h:
src/ds4.h:
