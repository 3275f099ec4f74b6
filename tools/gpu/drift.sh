#!/bin/bash
# cudadrift diagnostic: teacher-forced logits of the full-size synthetic model,
# CUDA vs CPU and CPU vs a 1-ulp-perturbed CPU, with and without the KV QAT
# simulation (DS4_DIAG_EXACT_KV, DS4_DIAG_PERTURB: see src/cpu/cpu.h).
#   SYNTH_ARGS="--gain 5e-5"  extra ds4-synth options; the file is then named
#                             after them (/dev/shm/flash-gain5e-5.gguf), so the
#                             default /dev/shm/flash.gguf is never reused for it
#   SWEEP="1e-4 2e-5"         instead: for each gain, synth, then CPU vs
#                             perturbed CPU with QAT on only (~70 s a gain)
# 49 teacher-forced positions (a 17-token prompt + 32 greedy tokens is what
# fullcheck.sh compares). Results go to $OUT/drift*.txt.
set -u
cd "$(dirname "$0")"
export LD_LIBRARY_PATH=$PWD/lib:${LD_LIBRARY_PATH:-}
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
W=/dev/shm/drift; mkdir -p $W
T=0,59065,109529,22019,43220,42333,20065,11533,63323,58500,113194,13509,109529,65823,101885,109529,85487,42333,106644,104504,78832,3085,91247,7726,118230,40913,64002,15551,99871,27006,5372,122108,70111,38856,84419,11290,55871,102388,19034,73157,47720,126005,31442,89114,9361,60278,113860,24719,80003
. ./flashfile.sh
run() { # name backend env...
    local name=$1 be=$2; shift 2
    [ $SECONDS -gt ${BUDGET:-330} ] && { echo "skip $name (time)"; return; }
    local t0=$SECONDS
    env "$@" timeout ${RUN_LIMIT:-90} ./bin/ds4 --$be --threads 16 -m "$M" --ctx 256 --tokens $T --dump-logits $W/$name.f32 2>&1 | tail -1
    echo "$name: $((SECONDS - t0))s (at ${SECONDS}s)"
}
# compare DIR PAIRS...: rel = max|a-b|/max|b| per position; a pair is "a/b".
compare() {
    python3 - "$@" <<'PY'
import numpy as np, sys, os
d, pairs = sys.argv[1], [p.split("/") for p in sys.argv[2:]]
V = 129280
L = {}
for n in {x for p in pairs for x in p}:
    f = os.path.join(d, n + ".f32")
    if os.path.exists(f) and os.path.getsize(f) > 0 and os.path.getsize(f) % (4 * V) == 0:
        L[n] = np.fromfile(f, np.float32).reshape(-1, V)
pairs = [p for p in pairs if p[0] in L and p[1] in L and L[p[0]].shape == L[p[1]].shape]
if not pairs: sys.exit(print("nothing to compare"))
n = L[pairs[0][1]].shape[0]
rel = {tuple(p): [np.abs(L[p[0]][i] - L[p[1]][i]).max() / np.abs(L[p[1]][i]).max() for i in range(n)] for p in pairs}
print("rel = max|a-b| / max|b| per position (teacher-forced, %d tokens)" % n)
print("pos " + " ".join("%14s" % "/".join(p) for p in pairs))
for i in range(n):
    print("%3d " % i + " ".join("%14.2e" % rel[tuple(p)][i] for p in pairs))
for a, b in pairs:
    am = sum(int(L[a][i].argmax() == L[b][i].argmax()) for i in range(n))
    at = " ".join("%d:%.1e" % (i, rel[(a, b)][i]) for i in (0, 1, 2, 5, 20, 48) if i < n)
    print("%s vs %s: max rel %.2e (at %s), argmax same at %d of %d positions" % (a, b, max(rel[(a, b)]), at, am, n))
ref = L[pairs[0][1]]
top2 = -np.sort(-ref, axis=1)[:, :2]
gap = top2[:, 0] - top2[:, 1]
print("%s: logit std %.3f, max|logit| %.2f, top1-top2 gap median %.3f min %.4f, distinct argmax %d of %d"
      % (pairs[0][1], ref.std(axis=1).mean(), np.abs(ref).max(axis=1).mean(), np.median(gap), gap.min(),
         len(set(ref.argmax(axis=1).tolist())), n))
PY
}
if [ -n "${SWEEP:-}" ]; then
    for g in $SWEEP; do
        flash_file ${SYNTH_ARGS:-} --gain $g
        echo "gain $g: synth done at ${SECONDS}s"
        run cpu cpu X=1
        run cpu_p7 cpu DS4_DIAG_PERTURB=1e-7
        echo "== gain $g" | tee -a $OUT/drift-sweep.txt
        compare $W cpu_p7/cpu | tail -2 | tee -a $OUT/drift-sweep.txt
        rm -f "$M" $W/cpu.f32 $W/cpu_p7.f32
    done
    exit 0
fi
flash_file ${SYNTH_ARGS:-}
echo "model $M, synth done at ${SECONDS}s"
run cpu_x cpu DS4_DIAG_EXACT_KV=1
run cuda_x cuda DS4_DIAG_EXACT_KV=1
run cpu cpu X=1
run cpu_p7 cpu DS4_DIAG_PERTURB=1e-7
run cpu_xp7 cpu DS4_DIAG_EXACT_KV=1 DS4_DIAG_PERTURB=1e-7
run cuda cuda X=1
run cpu_p6 cpu DS4_DIAG_PERTURB=1e-6
compare $W cuda/cpu cpu_p7/cpu cpu_p6/cpu cuda_x/cpu_x cpu_xp7/cpu_x cpu_x/cpu | tee $OUT/drift.txt
echo "compare done at ${SECONDS}s"
# GPUCHECK=1: same seed as /work/.device/14/gpucheck_full.log, KV QAT off:
# one-step and snapshot checks (both directions) without the rounding amplifier.
if [ -n "${GPUCHECK:-}" ]; then
    DS4_DIAG_EXACT_KV=1 timeout 120 ./bin/ds4-gpucheck --model "$M" --tokens 20 \
        --seed 4765560845961020833 2>&1 | grep -v "^ok   state layer" | tee $OUT/gpucheck_exact.log
fi
rm -f $W/*.f32
echo "end at ${SECONDS}s"
