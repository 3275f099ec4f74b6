#!/bin/bash
# The full-size call of a session (nvidia-h200): the correctness gates, the
# copy ceiling, ds4-bench 2K…32K, then the previous build (old/) against this
# one (bin/) at 2K and 32K, the host's share of a decoded token on the full
# model (run.sh nsysbench), and last the full-size greedy check: 32 tokens
# CUDA vs CPU on the ordered model (fullcheck.sh, ds4-synth --gain 5e-5; it
# replaces the default file in /dev/shm). Run from a folder made by
# tools/gpu/pack.sh; about 8 minutes.
cd "$(dirname "$0")"
export LD_LIBRARY_PATH=$PWD/lib:${LD_LIBRARY_PATH:-}
OUT=${OUT:-$PWD/out}; mkdir -p $OUT
export F4X_TOKENS=200
./run.sh kernels tiny flash4 flash4x > $OUT/gates.txt 2>&1
grep -E "FAIL|passed|body only" $OUT/gates.txt
FULL_CTX_MAX=32768 FULL_TIMEOUT=330 ./perf.sh copy full 2>&1 | grep -E "d2d|synth|^[0-9]|^ctx" | tail -20
for b in ${AB:-old bin}; do
  timeout 150 ./$b/ds4-bench --cuda -m /dev/shm/flash.gguf --ctx-start 2048 --ctx-max 32768 --step-incr 30720 --gen-tokens 64 -o $OUT/ab-$b.csv >/dev/null 2>&1
  echo "A/B $b:"; tail -2 $OUT/ab-$b.csv
done
NSYSBENCH_MODEL=/dev/shm/flash.gguf timeout 200 ./run.sh nsysbench 2>&1 | grep -E "^nsysbench"
SYNTH_ARGS="--gain 5e-5" KERNELS=0 timeout 200 ./fullcheck.sh 2>&1 | grep -E "RESULT|max \||exit"
