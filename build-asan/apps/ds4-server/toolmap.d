build-asan/apps/ds4-server/toolmap.o: apps/ds4-server/toolmap.c \
 apps/ds4-server/server.h src/ds4.h
apps/ds4-server/server.h:
src/ds4.h:
