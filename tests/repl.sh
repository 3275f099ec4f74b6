#!/usr/bin/env bash
# Drives the ds4 REPL in a real terminal (tmux): multi-turn chat that reuses
# the live session, /read, /save + /load, Ctrl+C during a reply, /quit.
# Prints "N passed, N failed" like every test.
set -u
ROOT=${DS4_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
DS4=$ROOT/build/bin/ds4
TINY=${DS4_TINY:-$ROOT/build/tiny.gguf}
pass=0; fail=0
ok()  { pass=$((pass+1)); echo "ok   $1"; }
bad() { fail=$((fail+1)); echo "FAIL $1"; }
if ! command -v tmux >/dev/null || [ ! -x "$DS4" ] || [ ! -f "$TINY" ]; then
  echo "FAIL setup: need tmux, $DS4 and $TINY"; echo "0 passed, 1 failed"; exit 1
fi
TMP=$(mktemp -d)
# One tmux server per REPL run: reusing a socket right after kill-server can
# attach to the dying server.
RUN=0
T="tmux -S $TMP/tmux0.sock"
trap 'for s in "$TMP"/tmux*.sock; do tmux -S "$s" kill-server 2>/dev/null; done; rm -rf "$TMP"' EXIT

screen() { $T capture-pane -p -J -S -2000 -t repl; }
# wait_for REGEX TIMEOUT_S: poll the screen until REGEX shows up.
wait_for() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    screen | grep -Eq -- "$1" && return 0
    sleep 0.1
  done
  return 1
}
count() { screen | grep -Ec -- "$1"; }
start() { # start REPL with extra args
  $T kill-server 2>/dev/null
  RUN=$((RUN + 1))
  T="tmux -S $TMP/tmux$RUN.sock"
  $T -f /dev/null new-session -d -s repl -x 200 -y 50 \
    "HOME=$TMP $DS4 -m $TINY --cpu --threads 2 --ctx 4096 --nothink --temp 0 $*; echo REPL-EXITED \$?; sleep 30"
  wait_for 'ds4 chat' 20
}

# --- multi-turn, /read, /save, /load ----------------------------------------
if start -n 12; then ok "banner"; else bad "banner"; screen; fi
$T send-keys -t repl "hello there" Enter
if wait_for '^\[prompt [0-9]+ tok \(0 cached\)' 60; then ok "first turn answered"; else bad "first turn answered"; screen; fi
$T send-keys -t repl "and a second question" Enter
# The second turn must reuse the first turn's KV: a non-zero cached count.
if wait_for '^\[prompt [0-9]+ tok \([1-9][0-9]* cached\)' 60; then ok "second turn reuses the session"; else bad "second turn reuses the session"; screen; fi
printf 'a file the user reads in\n' > "$TMP/in.txt"
n_before=$(count '^\[prompt')
$T send-keys -t repl "/read $TMP/in.txt" Enter
for _ in $(seq 600); do [ "$(count '^\[prompt')" -gt "$n_before" ] && break; sleep 0.1; done
if [ "$(count '^\[prompt')" -gt "$n_before" ]; then ok "/read sends the file"; else bad "/read sends the file"; screen; fi
$T send-keys -t repl "/save $TMP/s.bin" Enter
if wait_for '^saved [0-9]+ tokens' 20; then ok "/save"; else bad "/save"; screen; fi
$T send-keys -t repl "/load $TMP/s.bin" Enter
if wait_for '^loaded [0-9]+ tokens' 20; then ok "/load"; else bad "/load"; screen; fi
# Ctrl+C while a long message is still being read (prefill): the half-read
# turn is dropped and the conversation is exactly what it was before.
n_saved=$(screen | grep -Eo '^saved [0-9]+ tokens' | tail -1 | grep -Eo '[0-9]+')
for i in $(seq 300); do printf 'word%d and some more text to read, ' "$i"; done > "$TMP/big.txt"
$T send-keys -t repl "/read $TMP/big.txt" Enter
sleep 0.6
$T send-keys -t repl C-c
if wait_for 'turn dropped' 60; then ok "Ctrl+C during prefill drops the turn"; else bad "Ctrl+C during prefill drops the turn"; screen | tail -5; fi
$T send-keys -t repl "/save $TMP/s2.bin" Enter
if wait_for "^saved $n_saved tokens .*s2.bin" 30; then ok "conversation unchanged after a dropped turn"; else bad "conversation unchanged after a dropped turn"; screen | tail -5; fi
# The same long turn read to its end: a prefill past half a second shows
# "reading N / M tokens" on the terminal, and the line is erased after it.
n_before=$(count '^\[prompt')
$T send-keys -t repl "/read $TMP/big.txt" Enter
if wait_for 'reading [0-9]+ / [0-9]+ tokens \([0-9]+ tok/s\)' 30; then ok "progress while a long turn is read"; else bad "progress while a long turn is read"; screen | tail -5; fi
for _ in $(seq 600); do [ "$(count '^\[prompt')" -gt "$n_before" ] && break; sleep 0.1; done
if ! screen | grep -q 'reading [0-9]'; then ok "progress line erased"; else bad "progress line erased"; screen | tail -5; fi
$T send-keys -t repl "/bogus" Enter
if wait_for 'unknown command /bogus' 10; then ok "unknown command reported"; else bad "unknown command reported"; fi
$T send-keys -t repl "/quit" Enter
if wait_for 'REPL-EXITED 0' 20; then ok "/quit exits 0"; else bad "/quit exits 0"; screen; fi

# --- Ctrl+C stops a reply without losing the conversation --------------------
start   # no -n: a reply runs until the context is full unless interrupted
$T send-keys -t repl "write forever" Enter
sleep 2
$T send-keys -t repl C-c
if wait_for 'cancelled\]' 20; then ok "Ctrl+C stops the reply"; else bad "Ctrl+C stops the reply"; screen; fi
$T send-keys -t repl "still there?" Enter
sleep 1
$T send-keys -t repl C-c
# The turn after the interruption still extends the same conversation.
if wait_for '^\[prompt [0-9]+ tok \([1-9][0-9]* cached\).*cancelled' 20; then ok "conversation kept after Ctrl+C"; else bad "conversation kept after Ctrl+C"; screen; fi
# Let the prompt come back (readline in raw mode) before sending EOF.
sleep 1
$T send-keys -t repl C-d
if wait_for 'REPL-EXITED 0' 20; then ok "Ctrl+D exits 0"; else bad "Ctrl+D exits 0"; screen; fi

# --- a reply cut by a full context: the transcript holds every token shown ----
# prompt + generated = the whole context, and /save finds exactly that many.
start --ctx 64
$T send-keys -t repl "fill it" Enter
if wait_for '^\[prompt [0-9]+ tok .*generated [0-9]+ tok.*length\]' 60; then ok "reply ends at the full context"; else bad "reply ends at the full context"; screen | tail -5; fi
read -r np ng < <(screen | grep -Eo '^\[prompt [0-9]+ tok \([0-9]+ cached\), generated [0-9]+' | tail -1 | grep -Eo '[0-9]+' | sed -n '1p;3p' | tr '\n' ' ')
$T send-keys -t repl "/save $TMP/full.bin" Enter
if wait_for '^saved [0-9]+ tokens' 20 && [ "$((np + ng))" = 64 ] && screen | grep -q '^saved 64 tokens'; then
  ok "full context: prompt $np + generated $ng = 64 tokens saved"
else bad "full context: prompt ${np:-?} + generated ${ng:-?} = 64 tokens saved"; screen | tail -5; fi
$T send-keys -t repl "/quit" Enter
wait_for 'REPL-EXITED 0' 20 || true

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
