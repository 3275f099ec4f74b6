#!/usr/bin/env bash
# Fuzzes every libFuzzer harness: builds them (`make fuzz`, clang), then runs
# each tests/fuzz/fuzz_<name>.c for FUZZ_SECONDS (default 30) seconds on a
# scratch copy of tests/fuzz/corpus/<name>/, so the repository is never
# modified. A harness passes when it ran its time without a crash, sanitizer
# report, leak, slow input (>10 s) or RSS over 2 GB; a failing input is kept
# under build/fuzz/artifacts/<name>/ to reproduce with `build/fuzz/fuzz_<name>
# FILE`. Last line: "N passed, N failed" (one per harness).
set -u
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-30}
# libFuzzer's seed: FUZZ_SEED, else taken from the checked-out commit, so
# retries of one commit's CI mutate the same way (as tests/srvfuzz.sh);
# 0 (outside git) lets libFuzzer pick one.
seed=${FUZZ_SEED:-$(h=$(git rev-parse --short=8 HEAD 2>/dev/null) && echo $((16#$h % 2147483647)) || echo 0)}
work=$(mktemp -d /tmp/ds4-fuzz.XXXXXX)
trap 'rm -rf "$work"' EXIT

if ! make fuzz >"$work/build.log" 2>&1; then
  tail -n 30 "$work/build.log"
  echo "make fuzz failed"
  echo "0 passed, 1 failed"
  exit 1
fi

pass=0; fail=0
for src in tests/fuzz/fuzz_*.c; do
  [ -f "$src" ] || continue
  harness=$(basename "$src" .c)
  name=${harness#fuzz_}
  bin=build/fuzz/$harness
  mkdir -p "$work/$name/corpus" "$work/$name/artifacts"
  if [ -d "tests/fuzz/corpus/$name" ]; then
    cp -r "tests/fuzz/corpus/$name/." "$work/$name/corpus/"
  fi
  echo "== $harness: ${secs}s on $(ls "$work/$name/corpus" | wc -l) seeds, -seed=$seed"
  "$bin" -seed="$seed" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$work/$name/artifacts/" "$work/$name/corpus" >"$work/$name/log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    grep -E '^Done [0-9]+ runs' "$work/$name/log" | tail -n 1
    pass=$((pass + 1))
  else
    tail -n 40 "$work/$name/log"
    keep=build/fuzz/artifacts/$name
    mkdir -p "$keep"
    cp "$work/$name/artifacts/"* "$keep/" 2>/dev/null
    echo "FAIL $harness (exit $rc); failing inputs in $keep/"
    fail=$((fail + 1))
  fi
done
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
