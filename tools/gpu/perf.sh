#!/bin/bash
# Device script for the speed work (tools/gpu/NOTES.md, "Full-size flash-q2"):
# run on the GPU machine from a folder holding bin/ (this build), old/ (the
# previous build's ds4-gpucheck and ds4-bench, for before/after in one call),
# lib/, tokenizer.json and run.sh.
#   perf.sh [copy] [gates] [before] [pick] [prof] [full] [fullold]
# gates = run.sh kernels tiny flash4 (the correctness gates + 4-layer timing).
# Logs go to $OUT. Prints a short summary last.
set -u
cd "$(dirname "$0")"
export LD_LIBRARY_PATH=$PWD/lib:${LD_LIBRARY_PATH:-}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
steps=${*:-copy gates before prof full}
for s in $steps; do
    case $s in
    copy)
        # Device-to-device copy: the practical bandwidth ceiling (bytes read + written).
        python3 - <<'PY' 2>&1 | tee "$OUT/copy.log"
import torch
a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda"); b = torch.empty_like(a)
a.random_(0, 255)
for _ in range(3): b.copy_(a)
e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
ts = []
for _ in range(20):
    e0.record(); b.copy_(a); e1.record(); torch.cuda.synchronize(); ts.append(e0.elapsed_time(e1))
ts.sort(); ms = ts[len(ts) // 2]
print("d2d copy: %.3f ms for 2 GiB, %.2f TB/s (read + write, median of 20)" % (ms, 2 * a.numel() / ms / 1e9))
PY
        ;;
    gates)
        ./run.sh kernels tiny flash4 ;;
    before)
        # The previous build on the same 4-layer file, 2K context (same command as run.sh flash4).
        ./old/ds4-gpucheck --model /dev/shm/f4.gguf --tokens 2048 --bench 200 --profile 2>&1 | tee "$OUT/before.log" ;;
    pick)
        # Keep whichever of this build (bin/) and the previous one (old/) decodes
        # the 4-layer file faster at 2K for the full run; the previous one then
        # runs its own gates here too (gates belong in the call of the timings).
        new=$(grep -h "at context 2048" "$OUT/flash4.log" | tail -1 | awk '{print $7}')
        old=$(grep -h "at context 2048" "$OUT/before.log" | tail -1 | awk '{print $7}')
        echo "pick: 2K ms/token new $new, previous $old" | tee "$OUT/pick.log"
        if python3 -c "import sys; sys.exit(0 if $old < 0.98 * $new else 1)"; then
            echo "pick: previous build" | tee -a "$OUT/pick.log"
            mkdir -p "$OUT/prev" && OUT=$OUT/prev BIN=./old ./run.sh kernels tiny flash4 | tail -12
            cp old/ds4-bench bin/ds4-bench
        else echo "pick: this build" | tee -a "$OUT/pick.log"; fi ;;
    prof)
        ./run.sh prof ;;
    full|fullold)
        rm -f /dev/shm/f4.gguf /dev/shm/tiny.gguf
        df -h /dev/shm | tee -a "$OUT/full.log"
        avail=$(df -B1G --output=avail /dev/shm | tail -1)
        [ "$avail" -lt 90 ] && mount -o remount,size=110G /dev/shm && df -h /dev/shm | tee -a "$OUT/full.log"
        if [ ! -f /dev/shm/flash.gguf ]; then
            t0=$(date +%s.%N)
            ./bin/ds4-synth --preset flash-q2 --threads 16 -o /dev/shm/flash.gguf --tokenizer tokenizer.json 2>&1 | tail -2 | tee -a "$OUT/full.log"
            t1=$(date +%s.%N)
            sz=$(stat -c %s /dev/shm/flash.gguf)
            python3 -c "print('synth: %.1f GB in %.1f s = %.2f GB/s' % ($sz/1e9, $t1-$t0, $sz/1e9/($t1-$t0)))" | tee -a "$OUT/full.log"
        fi
        bench=./bin/ds4-bench; [ $s = fullold ] && bench=./old/ds4-bench
        max=${FULL_CTX_MAX:-4096}; [ $s = fullold ] && max=2048
        timeout ${FULL_TIMEOUT:-300} $bench --cuda -m /dev/shm/flash.gguf --ctx-start 2048 --ctx-max $max --step-incr 2048 \
            --gen-tokens 64 -o "$OUT/$s.csv" 2>&1 | tail -5 | tee -a "$OUT/full.log"
        echo "== $s csv" | tee -a "$OUT/full.log"; cat "$OUT/$s.csv" | tee -a "$OUT/full.log" ;;
    esac
done
echo "== perf summary"
cat "$OUT"/copy.log 2>/dev/null
grep -h -E "FAIL|passed|decode|prefill|create" "$OUT"/*.log 2>/dev/null
grep -h -E "synth:|csv|^[0-9]|^ctx" "$OUT"/full.log 2>/dev/null
