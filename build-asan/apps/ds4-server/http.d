build-asan/apps/ds4-server/http.o: apps/ds4-server/http.c \
 apps/ds4-server/server.h src/ds4.h
apps/ds4-server/server.h:
src/ds4.h:
