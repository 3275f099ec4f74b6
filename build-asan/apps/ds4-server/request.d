build-asan/apps/ds4-server/request.o: apps/ds4-server/request.c \
 apps/ds4-server/server.h src/ds4.h
apps/ds4-server/server.h:
src/ds4.h:
