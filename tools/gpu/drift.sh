#!/bin/bash
# cudadrift diagnostic: teacher-forced logits of the full-size synthetic model,
# CUDA vs CPU and CPU vs a 1-ulp-perturbed CPU, with and without the KV QAT
# simulation (DS4_DIAG_EXACT_KV, DS4_DIAG_PERTURB: see src/cpu/cpu.h).
set -u
cd "$(dirname "$0")"
export LD_LIBRARY_PATH=$PWD/lib:${LD_LIBRARY_PATH:-}
W=/dev/shm/drift; mkdir -p $W
avail=$(df -B1G --output=avail /dev/shm | tail -1)
[ "$avail" -lt 90 ] && mount -o remount,size=110G /dev/shm
[ -f /dev/shm/flash.gguf ] || ./bin/ds4-synth --preset flash-q2 --threads 16 -o /dev/shm/flash.gguf --tokenizer tokenizer.json 2>&1 | tail -1
echo "synth done at ${SECONDS}s"
T=0,59065,109529,22019,43220,42333,20065,11533,63323,58500,113194,13509,109529,65823,101885,109529,85487,42333,106644,104504,78832
run() { # name backend env...
    local name=$1 be=$2; shift 2
    [ $SECONDS -gt ${BUDGET:-205} ] && { echo "skip $name (time)"; return; }
    local t0=$SECONDS
    local lim=$((218 - SECONDS)); [ $lim -gt 60 ] && lim=60
    env "$@" timeout $lim ./bin/ds4 --$be --threads 16 -m /dev/shm/flash.gguf --ctx 256 --tokens $T --dump-logits $W/$name.f32 2>&1 | tail -2
    echo "$name: $((SECONDS - t0))s (at ${SECONDS}s)"
}
run cpu_x cpu DS4_DIAG_EXACT_KV=1
run cuda_x cuda DS4_DIAG_EXACT_KV=1
run cpu cpu X=1
run cpu_p7 cpu DS4_DIAG_PERTURB=1e-7
run cpu_xp7 cpu DS4_DIAG_EXACT_KV=1 DS4_DIAG_PERTURB=1e-7
run cuda cuda X=1
run cpu_p6 cpu DS4_DIAG_PERTURB=1e-6
python3 - $W <<'PY' | tee $OUT/drift.txt
import numpy as np, sys, os
d = sys.argv[1]
L = {}
for n in "cpu cpu_p7 cpu_x cuda_x cpu_xp7 cuda cpu_p6".split():
    p = os.path.join(d, n + ".f32")
    if os.path.exists(p) and os.path.getsize(p) == 21 * 129280 * 4: L[n] = np.fromfile(p, np.float32).reshape(-1, 129280)
pairs = [("cuda", "cpu"), ("cpu_p7", "cpu"), ("cpu_p6", "cpu"), ("cuda_x", "cpu_x"), ("cpu_xp7", "cpu_x"), ("cpu_x", "cpu")]
pairs = [p for p in pairs if p[0] in L and p[1] in L]
print("rel = max|a-b| / max|b| per position (teacher-forced, 21 tokens)")
print("pos " + " ".join("%14s" % ("%s/%s" % p) for p in pairs))
n = min(L[p[1]].shape[0] for p in pairs) if pairs else 0
for i in range(n):
    print("%3d " % i + " ".join("%14.2e" % (np.abs(L[a][i] - L[b][i]).max() / np.abs(L[b][i]).max()) for a, b in pairs))
for a, b in pairs:
    am = sum(int(L[a][i].argmax() == L[b][i].argmax()) for i in range(n))
    print("%s vs %s: argmax same at %d of %d positions" % (a, b, am, n))
PY
echo "compare done at ${SECONDS}s"
# Same seed as /work/.device/14/gpucheck_full.log, KV QAT off: one-step and
# snapshot checks (both directions) without the rounding amplifier.
if [ $SECONDS -lt ${GC_BEFORE:-165} ]; then
    DS4_DIAG_EXACT_KV=1 timeout $((228 - SECONDS)) ./bin/ds4-gpucheck --model /dev/shm/flash.gguf --tokens 20 \
        --seed 4765560845961020833 2>&1 | grep -v "^ok   state layer" | tee $OUT/gpucheck_exact.log
fi
echo "end at ${SECONDS}s"
