#!/usr/bin/env bash
# ds4-bench on the tiny model (CPU): the CSV's shape and values, that a
# frontier's state does not depend on how generation went (the snapshot is
# restored: greedy and --sampled runs walk the same sequence), and exact
# errors for bad arguments. Speed itself is never asserted.
set -u
ROOT=${DS4_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
BENCH=$ROOT/build/bin/ds4-bench
TINY=${DS4_TINY:-$ROOT/build/tiny.gguf}
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
pass=0; fail=0
check() { if eval "$2"; then pass=$((pass+1)); echo "ok   $1"; else fail=$((fail+1)); echo "FAIL $1"; fi; }

args=(--cpu --threads 2 -m "$TINY" --ctx-start 64 --ctx-max 192 --step-incr 64 --gen-tokens 12)
"$BENCH" "${args[@]}" -o "$TMP/g.csv" 2>"$TMP/g.err"; rg=$?
"$BENCH" "${args[@]}" --sampled -o "$TMP/s.csv" 2>/dev/null; rs=$?
check "greedy and --sampled runs exit 0" '[ $rg = 0 ] && [ $rs = 0 ]'
check "header" '[ "$(head -1 "$TMP/g.csv")" = "ctx,prefill_tok_s,gen_tok_s,kv_bytes,weight_bytes_per_token,gen_weight_GB_s" ]'
check "one row per frontier: 64, 128, 192" '[ "$(tail -n +2 "$TMP/g.csv" | cut -d, -f1 | tr "\n" " ")" = "64 128 192 " ]'
check "speeds and bandwidth positive" 'tail -n +2 "$TMP/g.csv" | awk -F, "!(\$2 > 0 && \$3 > 0 && \$6 > 0) { exit 1 }"'
check "KV bytes grow with the frontier" 'tail -n +2 "$TMP/g.csv" | awk -F, "NR > 1 && \$4 <= prev { exit 1 } { prev = \$4 }"'
check "weight bytes a token: one value, as stated on stderr" '[ "$(tail -n +2 "$TMP/g.csv" | cut -d, -f5 | sort -u | wc -l)" = 1 ] && grep -q "backend, .* vocab, .* GB weights read per token" "$TMP/g.err"'
# Generation runs on a snapshot that is restored: the walked sequence's KV
# at each frontier is the same whatever was generated.
check "generation undone before the next interval (KV at each frontier: greedy = sampled)" '[ "$(cut -d, -f1,4,5 "$TMP/g.csv")" = "$(cut -d, -f1,4,5 "$TMP/s.csv")" ]'
"$BENCH" "${args[@]}" --gen-tokens 0 -o "$TMP/z.csv" 2>/dev/null
check "--gen-tokens 0: prefill only (gen 0)" 'tail -n +2 "$TMP/z.csv" | awk -F, "\$3 != 0 { exit 1 }"'

"$BENCH" -m "$TINY" --cpu --ctx-start 100 --ctx-max 50 2>"$TMP/e1"; r1=$?
check "--ctx-max below --ctx-start: exit 2 with a reason" '[ $r1 = 2 ] && grep -q "ctx-max is below --ctx-start" "$TMP/e1"'
"$BENCH" -m "$TINY" --cpu --gen-tokens -1 2>"$TMP/e2"; r2=$?
check "negative --gen-tokens: exit 2 naming the range" '[ $r2 = 2 ] && grep -q "gen-tokens expects an integer in \[0, 65536\]" "$TMP/e2"'
"$BENCH" -m "$TMP/missing.gguf" --cpu 2>"$TMP/e3"; r3=$?
check "missing model: exit 1 naming the file" '[ $r3 = 1 ] && grep -q "missing.gguf" "$TMP/e3"'
"$BENCH" --help >"$TMP/h"; rh=$?
check "--help exits 0 and names --sampled" '[ $rh = 0 ] && grep -q -- "--sampled" "$TMP/h"'

echo "$pass passed, $fail failed"
[ $fail = 0 ]
