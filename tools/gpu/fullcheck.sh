#!/bin/bash
# Full-size correctness on the GPU machine (issue: CUDA backend): a greedy
# continuation of 32 tokens of the full-size synthetic flash-q2 must be the
# same on CUDA and on the CPU reference, run on the same machine. Runs from a
# folder holding bin/, lib/, tokenizer.json and run.sh (tools/gpu/NOTES.md
# says how a run is packed). Logs to $OUT; the comparison prints last.
#   SYNTH_ARGS="--gain 5e-5"  extra ds4-synth options (an ordered random model:
#                             NOTES.md "An ordered random model"); the file is
#                             named after them, as in drift.sh, so the default
#                             /dev/shm/flash.gguf is never reused for them
#   KERNELS=0                 skip run.sh's kernel and tiny checks
set -u
cd "$(dirname "$0")"
export LD_LIBRARY_PATH=$PWD/lib:${LD_LIBRARY_PATH:-}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
N=${N_TOKENS:-32}
PROMPT=${PROMPT:-"Write a short story about a lighthouse keeper who collects lost letters."}
[ "${KERNELS:-1}" = 0 ] || ./run.sh kernels tiny 2>&1 | tail -4
# The model for these synth options (flashfile.sh: shared with drift.sh).
. ./flashfile.sh
flash_file ${SYNTH_ARGS:-}
echo "model $M"
for be in cuda cpu; do
    t0=$(date +%s.%N)
    timeout ${TIMEOUT:-240} ./bin/ds4 --$be --threads 16 -m "$M" --ctx 4096 --nothink \
        -p "$PROMPT" -n "$N" --dump-logprobs "$OUT/$be.json" --logprobs-top-k 2 2>&1 | tail -2
    echo "$be: exit ${PIPESTATUS[0]} in $(python3 -c "print('%.1f' % ($(date +%s.%N) - $t0))") s"
done
python3 - "$OUT/cuda.json" "$OUT/cpu.json" <<'PY'
import json, sys
a, b = (json.loads(open(p, "rb").read().decode("utf-8", "replace")) for p in sys.argv[1:3])
ta = [s["id"] for s in a["steps"]]; tb = [s["id"] for s in b["steps"]]
print("prompt tokens", a["prompt_tokens"], b["prompt_tokens"])
print("cuda", ta); print("cpu ", tb)
same = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
if same is None and len(ta) == len(tb):
    print("RESULT: identical greedy continuation of %d tokens" % len(ta))
else:
    i = same if same is not None else min(len(ta), len(tb))
    print("RESULT: first difference at step %d" % i)
    for s in (a["steps"], b["steps"]):
        if i < len(s): print("  top-2:", [(t["id"], round(t["logprob"], 4)) for t in s[i]["top"]])
md = max(abs(x["logprob"] - y["logprob"]) for x, y in zip(a["steps"], b["steps"]))
print("max |logprob(cuda) - logprob(cpu)| of the chosen tokens: %.2e" % md)
PY
