#!/bin/bash
# Resume after a restart (issue #8, last acceptance point): time-to-first-
# token of a long chat prompt cold, then again after the server was stopped
# (SIGTERM: checkpoints written) and started again on the same --kv-disk-dir.
#
#   tools/gpu/resume.sh -m MODEL.gguf [options]
#
#   -m FILE        model (required)
#   --bin DIR      folder holding ds4-server (default: ./bin, else build/bin);
#                  a lib/ folder beside it goes on LD_LIBRARY_PATH
#   --tokens N     approximate prompt length in tokens (default 30000)
#   --ctx N        server --ctx (default: tokens + 8192, rounded up to 1024)
#   --kv-dir DIR   checkpoint folder on local disk (default: a fresh one under
#                  $TMPDIR or /tmp, removed at the end); must start empty
#   --align N      server --kv-align (default: the server's, 2048)
#   --cpu          run the server on the CPU backend (tests on the tiny model)
#   --threads N    server --threads
#   --max-tokens N tokens generated per request (default 32)
#
# The prompt is deterministic English-like text built by a fixed generator
# and sized with /v1/messages/count_tokens. Requests are streamed OpenAI chat
# completions, greedy, thinking off; TTFT is the time from sending the request
# to the first SSE chunk carrying content or reasoning text. Turn 2 sends
# turn 1 (with the answer the server gave) plus a short new user message and
# reads usage.prompt_tokens_details.cached_tokens.
#
# Prints a table; with $OUT set, also writes $OUT/resume.txt, resume.json and
# the two servers' logs and traces. Exit 0 when both turns answered and turn 2
# reused at least turn 1's prompt up to its last --kv-align multiple (what a
# checkpoint guarantees; the whole turn 1 session when the answer's text
# re-tokenizes to the generated ids), 1 otherwise.
#
# Needs python3 only (no curl/node). Checked on the tiny model with
#   tools/gpu/resume.sh -m build/tiny.gguf --bin build/bin --cpu --tokens 2000 --align 256
set -u
exec python3 - "$@" <<'PY'
import json, os, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request

def usage(msg):
    sys.stderr.write("resume.sh: %s (see the top of tools/gpu/resume.sh)\n" % msg)
    sys.exit(2)

args = {"tokens": 30000, "max_tokens": 32, "cpu": False}
argv = sys.argv[1:]
while argv:
    a = argv.pop(0)
    if a == "--cpu":
        args["cpu"] = True
        continue
    if not argv:
        usage("missing value for " + a)
    v = argv.pop(0)
    key = {"-m": "model", "--model": "model", "--bin": "bin", "--tokens": "tokens", "--ctx": "ctx",
           "--kv-dir": "kv_dir", "--align": "align", "--threads": "threads", "--max-tokens": "max_tokens"}.get(a)
    if not key:
        usage("unknown option " + a)
    args[key] = int(v) if key in ("tokens", "ctx", "align", "threads", "max_tokens") else v
if "model" not in args:
    usage("-m MODEL.gguf is required")
bindir = args.get("bin") or ("./bin" if os.path.exists("./bin/ds4-server") else "build/bin")
server_bin = os.path.join(bindir, "ds4-server")
if not os.access(server_bin, os.X_OK):
    usage("no ds4-server in " + bindir)
# A device folder ships the .so files the machine lacks in lib/ beside bin/.
env = dict(os.environ)
libdir = os.path.join(os.path.dirname(os.path.abspath(bindir)), "lib")
if os.path.isdir(libdir):
    env["LD_LIBRARY_PATH"] = libdir + ":" + env.get("LD_LIBRARY_PATH", "")
tokens = args["tokens"]
ctx = args.get("ctx") or (tokens + 8192 + 1023) // 1024 * 1024
out = os.environ.get("OUT")
if out:
    os.makedirs(out, exist_ok=True)
work = tempfile.mkdtemp(prefix="ds4-resume-")
kv_dir = args.get("kv_dir") or os.path.join(work, "kv")
if os.path.isdir(kv_dir) and os.listdir(kv_dir):
    usage("--kv-dir %s is not empty: the first turn must be cold" % kv_dir)
logdir = out or work

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p

class Server:
    def __init__(self, name):
        self.name, self.port = name, free_port()
        self.base = "http://127.0.0.1:%d" % self.port
        cmd = [server_bin, "-m", args["model"], "--ctx", str(ctx), "--port", str(self.port),
               "--kv-disk-dir", kv_dir, "--trace", os.path.join(logdir, name + ".trace")]
        if args["cpu"]:
            cmd.append("--cpu")
        if "align" in args:
            cmd += ["--kv-align", str(args["align"])]
        if "threads" in args:
            cmd += ["--threads", str(args["threads"])]
        self.log = open(os.path.join(logdir, name + ".log"), "w")
        t0 = time.time()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        # Loading the full model takes minutes on a cold page cache.
        while time.time() - t0 < 1800:
            if self.proc.poll() is not None:
                sys.exit("resume.sh: %s exited with %d (log %s): %s" % (name, self.proc.returncode,
                         self.log.name, open(self.log.name).read()[-2000:]))
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            self.proc.kill()
            sys.exit("resume.sh: %s did not come up" % name)
        self.startup_s = time.time() - t0

    def stop(self):
        t0 = time.time()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=1800)
        self.log.close()
        if rc != 0:
            sys.exit("resume.sh: %s exited %d on SIGTERM" % (self.name, rc))
        return time.time() - t0

def post(base, path, body):
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.load(r)

def chat(base, messages):
    """Streamed, greedy, thinking off. Returns (ttft_s, total_s, text, usage)."""
    body = {"model": "deepseek-chat", "messages": messages, "stream": True, "temperature": 0,
            "max_tokens": args["max_tokens"], "stream_options": {"include_usage": True}}
    req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0 = time.time()
    ttft, text, use = None, "", None
    with urllib.request.urlopen(req, timeout=3600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                sys.exit("resume.sh: stream error: %s" % ev["error"])
            if ev.get("usage"):
                use = ev["usage"]
            for ch in ev.get("choices", []):
                d = ch.get("delta", {})
                piece = (d.get("content") or "") + (d.get("reasoning_content") or "")
                if piece and ttft is None:
                    ttft = time.time() - t0
                text += d.get("content") or ""
    return ttft, time.time() - t0, text, use or {}

# Deterministic text: words drawn by a fixed LCG, sentences of 8-20 words.
WORDS = ("the a of to and in that it is was for on are as with his they at be this from have or by one had "
         "not but what all were when we there can an your which their said if do will each about how up out "
         "them then she many some so these would other into has more her two like him see time could no make "
         "than first been its who now people my made over did down only way find use may water long little very "
         "after words called just where most know get through back much before go good new write our used me "
         "man too any day same right look think also around another came come work three word must because "
         "does part even place well such here take why things help put years different away again off went old "
         "number great tell men say small every found still between name should home big give air line set own "
         "under read last never us left end along while might next sound below saw something thought both few "
         "those always looked show large often together asked house don't world going want school important").split()

def make_text(n_words):
    x, out, k, have = 12345, [], 0, 0
    while have < n_words:
        x = (x * 1103515245 + 12345) % (1 << 31)
        n = 8 + x % 13
        words = []
        for _ in range(n):
            x = (x * 1103515245 + 12345) % (1 << 31)
            words.append(WORDS[(x >> 8) % len(WORDS)])
        k += 1
        have += n
        out.append("%d. %s." % (k, " ".join(words).capitalize()))
    return " ".join(out)

def count(base, text):
    r = post(base, "/v1/messages/count_tokens", {"model": "x", "messages": [{"role": "user", "content": text}]})
    return r["input_tokens"]

s1 = Server("server1")
# Size the prompt: measure tokens per word on a sample, then one correction.
sample = make_text(2000)
per_word = count(s1.base, sample) / 2000.0
n_words = max(50, int(tokens / per_word))
text = make_text(n_words)
n_tok = count(s1.base, text)
n_words = max(50, int(n_words * tokens / n_tok))
text = make_text(n_words)
question = text + "\n\nIn one sentence: which number appears most often above?"
turn1 = [{"role": "user", "content": question}]
ttft1, total1, answer1, use1 = chat(s1.base, turn1)
stop_s = s1.stop()
ckpts = [f for f in os.listdir(kv_dir) if f.endswith(".kv")]
ckpt_bytes = sum(os.path.getsize(os.path.join(kv_dir, f)) for f in ckpts)

s2 = Server("server2")
turn2 = turn1 + [{"role": "assistant", "content": answer1}, {"role": "user", "content": "Now say it in three words."}]
ttft2, total2, answer2, use2 = chat(s2.base, turn2)
s2.stop()

p1, p2 = use1.get("prompt_tokens", 0), use2.get("prompt_tokens", 0)
c1 = (use1.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
c2 = (use2.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
# What the server promises after a restart: at least turn 1's prompt up to
# its last aligned checkpoint (the prompt less its 2-token generation suffix,
# rounded down to --kv-align); the whole turn when the answer's text
# re-tokenizes to the ids that were generated.
align = args.get("align", 2048)
need = (p1 - 2) // align * align
ok = ttft1 is not None and ttft2 is not None and need > 0 and c2 >= need
rows = [("cold (turn 1)", s1.startup_s, p1, c1, ttft1, total1),
        ("after restart (turn 2)", s2.startup_s, p2, c2, ttft2, total2)]
# The server's own startup lines: backend, sessions and the free memory behind them.
said = [l.strip() for l in open(os.path.join(logdir, "server1.log")) if "backend" in l or "sessions:" in l]
lines = ["resume: %s, ctx %d, kv dir %s" % (os.path.basename(args["model"]), ctx, kv_dir)] + said + [
                  "%-24s %10s %8s %8s %9s %9s" % ("request", "startup_s", "prompt", "cached", "ttft_s", "total_s")]
for name, st, p, c, t, tot in rows:
    lines.append("%-24s %10.1f %8d %8d %9s %9.2f" % (name, st, p, c, "%.3f" % t if t is not None else "none", tot))
lines.append("shutdown (SIGTERM, checkpoints written): %.1f s; %d checkpoint files, %.1f MiB" %
             (stop_s, len(ckpts), ckpt_bytes / 2**20))
if ttft1 and ttft2:
    lines.append("TTFT speedup after restart: %.1fx" % (ttft1 / ttft2))
lines.append("result: %s (turn 2 reused %d tokens; turn 1 had %d prompt + %d generated; needs >= %d, "
             "its last aligned checkpoint)" % ("PASS" if ok else "FAIL", c2, p1, use1.get("completion_tokens", 0), need))
print("\n".join(lines))
if out:
    open(os.path.join(out, "resume.txt"), "w").write("\n".join(lines) + "\n")
    json.dump({"model": args["model"], "ctx": ctx, "cpu": args["cpu"], "checkpoints": len(ckpts),
               "checkpoint_bytes": ckpt_bytes, "shutdown_s": stop_s,
               "turn1": {"startup_s": s1.startup_s, "prompt_tokens": p1, "cached_tokens": c1, "ttft_s": ttft1,
                         "total_s": total1, "usage": use1},
               "turn2": {"startup_s": s2.startup_s, "prompt_tokens": p2, "cached_tokens": c2, "ttft_s": ttft2,
                         "total_s": total2, "usage": use2},
               "pass": ok}, open(os.path.join(out, "resume.json"), "w"), indent=1)
# work holds the default kv dir and, without $OUT, the logs: kept on failure.
if ok:
    shutil.rmtree(work, ignore_errors=True)
else:
    print("logs and traces: %s" % logdir)
sys.exit(0 if ok else 1)
PY
