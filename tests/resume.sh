#!/usr/bin/env bash
# tools/gpu/resume.sh (the GPU restart/TTFT check) on the tiny model with the
# CPU backend and a small prompt, so the script is known to work before it
# runs on a GPU machine. Ends with "N passed, N failed".
set -u
ROOT=${DS4_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
BIN=${DS4_BIN:-$ROOT/build/bin}
TINY=${DS4_TINY:-$ROOT/build/tiny.gguf}
pass=0; fail=0
check() { local name=$1; shift; if "$@"; then pass=$((pass + 1)); echo "ok   $name"; else fail=$((fail + 1)); echo "FAIL $name"; fi; }
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
OUT=$OUT "$ROOT/tools/gpu/resume.sh" -m "$TINY" --bin "$BIN" --cpu --threads 2 --tokens 1200 --align 256 --max-tokens 8 > "$OUT/stdout" 2>&1
rc=$?
sed 's/^/   /' "$OUT/stdout"
check "exit 0 (PASS)" [ "$rc" = 0 ]
check "table and result printed" bash -c "grep -q '^cold (turn 1) ' '$OUT/stdout' && grep -q '^after restart (turn 2) ' '$OUT/stdout' && grep -q '^result: PASS' '$OUT/stdout'"
# ~1200 tokens asked; turn 2 restored from disk at least to turn 1's last
# 256-aligned point, and its first token came sooner than the cold one's.
check "resume.json: prompt near --tokens, disk reuse, faster first token" python3 - "$OUT/resume.json" <<'P'
import json, sys
r = json.load(open(sys.argv[1]))
t1, t2 = r["turn1"], r["turn2"]
assert 1100 <= t1["prompt_tokens"] <= 1300, t1
assert t1["cached_tokens"] == 0 and t2["cached_tokens"] >= (t1["prompt_tokens"] - 2) // 256 * 256 > 0, (t1, t2)
assert t2["prompt_tokens"] > t1["prompt_tokens"] and r["checkpoints"] > 0 and r["pass"]
assert 0 < t2["ttft_s"] < t1["ttft_s"], (t1["ttft_s"], t2["ttft_s"])
P
check "server logs and traces kept in \$OUT" bash -c "[ -s '$OUT/server1.log' ] && [ -s '$OUT/server2.trace' ] && [ -s '$OUT/resume.txt' ]"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
