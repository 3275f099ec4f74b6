#!/usr/bin/env bash
# Runs the whole suite: every build/tests/test_* binary, then every tests/*.sh
# and tests/node/*.test.mjs script. Each prints "N passed, N failed" as its
# last line; this sums them and ends with the total on its own line.
set -u
cd "$(dirname "$0")/.."
export DS4_ROOT=$PWD
export DS4_BIN=$PWD/build/bin
export DS4_SHARED=${DS4_SHARED:-$(cd .. && pwd)/shared}
export DS4_TINY=${DS4_TINY:-$PWD/build/tiny.gguf}

# The tiny model every engine test uses, regenerated when the generator changes.
if [ -x build/bin/ds4-synth ] && { [ ! -f "$DS4_TINY" ] || [ build/bin/ds4-synth -nt "$DS4_TINY" ]; }; then
  build/bin/ds4-synth --preset tiny --mtp --seed 1 -o "$DS4_TINY" >/dev/null || echo "warning: ds4-synth failed"
fi

pass=0; fail=0; broken=()
run_one() {
  local name=$1; shift
  echo "== $name"
  local out rc
  out=$("$@" 2>&1); rc=$?
  printf '%s\n' "$out" | sed 's/^/   /'
  local last
  last=$(printf '%s\n' "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed' | tail -n1)
  if [ -n "$last" ]; then
    local p f
    p=$(echo "$last" | sed -E 's/^([0-9]+) passed.*/\1/')
    f=$(echo "$last" | sed -E 's/^[0-9]+ passed, ([0-9]+) failed.*/\1/')
    pass=$((pass + p)); fail=$((fail + f))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then fail=$((fail + 1)); broken+=("$name (exit $rc)"); fi
  else
    fail=$((fail + 1)); broken+=("$name (exit $rc, no summary)")
  fi
}

for t in build/tests/test_*; do
  [ -x "$t" ] || continue
  run_one "$(basename "$t")" "$t"
done
for s in tests/*.sh; do
  [ "$s" = tests/run.sh ] && continue
  [ -f "$s" ] || continue
  run_one "$(basename "$s")" bash "$s"
done
if [ -d tests/node ] && [ -d tests/node_modules ]; then
  for s in tests/node/*.test.mjs; do
    [ -f "$s" ] || continue
    run_one "$(basename "$s")" node "$s"
  done
fi

for b in "${broken[@]+"${broken[@]}"}"; do echo "broken: $b"; done
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
