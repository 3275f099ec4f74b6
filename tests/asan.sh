#!/usr/bin/env bash
# The server under AddressSanitizer + LeakSanitizer + UBSan, short version:
# builds ds4-server into build-asan/ and runs the loopback load test against
# it (8 clients x 5 requests, then SIGTERM): any memory error, leak or UB
# makes the server exit non-zero, which the test reports.
set -u
cd "$(dirname "$0")/.."
log=$(mktemp); trap 'rm -f "$log"' EXIT
if ! make CUDA=0 BUILD=build-asan CC='cc -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined' \
     -j2 build-asan/bin/ds4-server build-asan/bin/ds4-synth >"$log" 2>&1; then
  tail -n 30 "$log"; echo "asan build failed"; echo "0 passed, 1 failed"; exit 1
fi
[ -d tests/node_modules ] || { echo "tests/node_modules missing (scripts/deps.sh)"; echo "0 passed, 1 failed"; exit 1; }
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=23
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
DS4_BIN=$PWD/build-asan/bin exec node tests/node/load.test.mjs
