build-asan/apps/ds4-server/responses.o: apps/ds4-server/responses.c \
 apps/ds4-server/server.h src/ds4.h
apps/ds4-server/server.h:
src/ds4.h:
