#!/usr/bin/env bash
# Structure-aware fuzzing of ds4-server's request handling over real HTTP,
# under AddressSanitizer + LeakSanitizer + UBSan: builds the server into
# build-asan/ (as tests/asan.sh does) and runs tests/srvfuzz.py against it on
# the tiny model for SRVFUZZ_TIME seconds (default 45): mutated requests of
# every endpoint, each answer judged (status, body shape, stream framing,
# time), /health throughout, then SIGTERM and a clean exit. SRVFUZZ_SEED
# repeats a run (the seed is printed); by default it is taken from the
# checked-out commit, so a CI run is the same on every retry of one commit
# (a failure is a real one, reproduced by running again) and new commits
# explore new requests; outside git it is random. A failing run keeps its
# work dir with the server log and the failing requests. Ends with "N
# passed, N failed".
set -u
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/ds4-srvfuzz.XXXXXX)
keep=0
trap '[ "$keep" = 1 ] || rm -rf "$work"' EXIT
if ! make CUDA=0 BUILD=build-asan CC='cc -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined' \
     -j2 build-asan/bin/ds4-server build-asan/bin/ds4-synth >"$work/build.log" 2>&1; then
  tail -n 30 "$work/build.log"; echo "asan build failed"; echo "0 passed, 1 failed"; exit 1
fi
MODEL=${DS4_TINY:-}
if [ -z "$MODEL" ] || [ ! -f "$MODEL" ]; then
  MODEL=$work/tiny.gguf
  build-asan/bin/ds4-synth --preset tiny --seed 1 -o "$MODEL" >/dev/null 2>&1 || { echo "ds4-synth failed"; echo "0 passed, 1 failed"; exit 1; }
fi
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=23
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
[ -n "${SRVFUZZ_SEED:-}" ] || { h=$(git rev-parse --short=8 HEAD 2>/dev/null) && export SRVFUZZ_SEED=$((16#$h)); }
python3 tests/srvfuzz.py "$PWD/build-asan/bin/ds4-server" "$MODEL" "$work"
rc=$?
if [ $rc -ne 0 ]; then keep=1; echo "srvfuzz: work dir kept: $work"; fi
exit $rc
