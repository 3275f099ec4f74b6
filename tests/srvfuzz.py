#!/usr/bin/env python3
"""Structure-aware fuzzer for ds4-server's request handling, over real HTTP.

Starts the server given on the command line (an ASan/UBSan build, see
tests/srvfuzz.sh) on the tiny model, sends it mutated requests for
SRVFUZZ_TIME seconds, then SIGTERMs it. Each request starts from a valid
template of its endpoint and gets a few structural mutations (a value of
another JSON type, a deleted/duplicated key, wrapping, deep nesting, a subtree
spliced from another protocol, odd strings and numbers, raw invalid UTF-8,
lone surrogates, NUL escapes), sometimes damaged bytes or a chunked body. An
answer that called tools gets a follow-up turn sending the calls back.

The oracle, per request: an answer within SRVFUZZ_LIMIT seconds, a status the
server may give, a body of the protocol's shape (an error body for 4xx; a
well-formed event stream ending as the protocol ends it for stream=true;
valid UTF-8 JSON otherwise), no 200 for a request whose checked fields have
the wrong type (must_refuse), and /health answering throughout. At the end
the server must exit 0 on SIGTERM: ASan reports (leaks included) make it
exit 23.

SRVFUZZ_JOBS clients (3): one is a fast lane that sends only requests that
never wait for a generation; the others wait seconds for each prefill.
Request i is built from its own generator seeded with (SRVFUZZ_SEED, i), so a
failure is reproduced with SRVFUZZ_SEED=S SRVFUZZ_ONLY=i whatever ran
concurrently. Failing requests are saved as WORKDIR/fail-<i>.http.

usage: srvfuzz.py SERVER_BIN MODEL WORKDIR. Last line: "N passed, N failed".
"""
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

SERVER, MODEL, WORK = sys.argv[1:4]
SEED = int(os.environ.get('SRVFUZZ_SEED') or random.SystemRandom().randrange(1 << 32))
SECONDS = float(os.environ.get('SRVFUZZ_TIME', '45'))
# A generation waits for the one before it: two prefills of a prompt near
# the context (768 tokens, ~6 s each under ASan, twice that on a loaded
# machine) stay well within the limit.
LIMIT = float(os.environ.get('SRVFUZZ_LIMIT', '30'))
JOBS = int(os.environ.get('SRVFUZZ_JOBS', '3'))
ONLY = os.environ.get('SRVFUZZ_ONLY')
# 1.5 to 2.5 requests a second here (a tools prompt is ~450 tokens, ~3 s of
# prefill under ASan); one every two seconds is the floor of a run that did
# its job on a loaded machine.
MIN_REQUESTS = int(os.environ.get('SRVFUZZ_MIN') or max(20, int(SECONDS / 2)))
MAX_BODY = 262144
CTX = 768                         # the longest template turn with its follow-up is ~600 tokens
sys.setrecursionlimit(20000)   # nesting mutations stack up past 128 levels

# ---- JSON trees that keep duplicate keys and verbatim spellings ----------

class Obj:
    """A JSON object as a list of [key, value] pairs: duplicate keys survive."""
    def __init__(self, pairs):
        self.pairs = pairs

class Raw:
    """JSON text sent as is: numbers like 1e999, \\ud800, raw invalid UTF-8."""
    def __init__(self, data):
        self.data = data if isinstance(data, bytes) else data.encode()

def tree(v):
    if isinstance(v, dict):
        return Obj([[k, tree(x)] for k, x in v.items()])
    if isinstance(v, list):
        return [tree(x) for x in v]
    return v

def dump(v):
    if isinstance(v, Raw):
        return v.data
    if isinstance(v, Obj):
        return b'{' + b','.join(dump(k) + b':' + dump(x) for k, x in v.pairs) + b'}'
    if isinstance(v, list):
        return b'[' + b','.join(dump(x) for x in v) + b']'
    return json.dumps(v, ensure_ascii=False).encode()

def copy(v):
    if isinstance(v, Obj):
        return Obj([[k, copy(x)] for k, x in v.pairs])
    if isinstance(v, list):
        return [copy(x) for x in v]
    return v

def first(o, key):
    """The value cJSON sees for key: the first pair with that name."""
    if isinstance(o, Obj):
        for k, v in o.pairs:
            if k == key:
                return v
    return None

# ---- templates: valid requests of every endpoint ------------------------

WEATHER = {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}
OA_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}}]
AN_TOOLS = [{"name": "get_weather", "description": "Weather", "input_schema": WEATHER, "cache_control": {"type": "ephemeral"}},
            {"type": "web_search_20250305", "name": "web_search"}]
RS_TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather", "parameters": WEATHER},
            {"type": "custom", "name": "apply_patch", "description": "Patch", "format": {"type": "grammar", "definition": "x"}},
            {"type": "web_search"}]

TEMPLATES = {
    '/v1/chat/completions': [
        {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64},
        {"model": "deepseek-chat", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 64,
         "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 7, "stop": ["zz", "\n\n"],
         "messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]},
        {"model": "deepseek-reasoner", "max_completion_tokens": 64, "reasoning_effort": "high", "tools": OA_TOOLS, "tool_choice": "auto",
         "messages": [{"role": "developer", "content": "Use tools."}, {"role": "user", "content": "Weather?"},
                      {"role": "assistant", "content": None, "reasoning_content": "Look it up.",
                       "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}}]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                      {"role": "user", "content": "Thanks"}]},
        {"messages": [{"role": "user", "content": "w"}], "tools": OA_TOOLS, "max_tokens": 64, "stream": True,
         "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "thinking": {"type": "disabled"}},
        {"messages": [{"role": "user", "content": "w"}], "tools": OA_TOOLS, "tool_choice": "required", "think": True, "max_tokens": 64},
    ],
    '/v1/completions': [
        {"model": "deepseek-v4-flash", "prompt": "Once upon", "max_tokens": 64, "stop": "\n"},
        {"prompt": ["Once"], "max_tokens": 64, "stream": True, "temperature": 0, "reasoning_effort": "none"},
    ],
    '/v1/messages': [
        {"model": "claude", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]},
        {"model": "claude", "max_tokens": 64, "stream": True, "system": [{"type": "text", "text": "x-anthropic-billing"}, {"type": "text", "text": "Be brief."}],
         "thinking": {"type": "enabled", "budget_tokens": 1024}, "stop_sequences": ["zz"], "tools": AN_TOOLS, "tool_choice": {"type": "auto"},
         "messages": [{"role": "user", "content": [{"type": "text", "text": "Weather?"}, {"type": "image", "source": {"type": "base64", "data": ""}}]},
                      {"role": "assistant", "content": [{"type": "thinking", "thinking": "Look.", "signature": "s"},
                                                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}}]},
                      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                                                   {"type": "text", "text": "Thanks"}]}]},
        {"max_tokens": 64, "system": "Be brief.", "output_config": {"effort": "max"}, "tools": AN_TOOLS,
         "tool_choice": {"type": "tool", "name": "get_weather"}, "messages": [{"role": "user", "content": "w"}]},
        {"max_tokens": 64, "tools": AN_TOOLS, "tool_choice": {"type": "any"}, "stream": True, "messages": [{"role": "user", "content": "w"}]},
    ],
    '/v1/messages/count_tokens': [
        {"model": "claude", "system": "Be brief.", "messages": [{"role": "user", "content": "Hi"}], "tools": AN_TOOLS},
    ],
    '/v1/responses': [
        {"model": "deepseek-v4-flash", "input": "Hi", "max_output_tokens": 64},
        {"instructions": "Be brief.", "stream": True, "max_output_tokens": 64, "reasoning": {"effort": "low"}, "tools": RS_TOOLS,
         "input": [{"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                   {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Look."}], "content": [{"type": "reasoning_text", "text": "Look."}]},
                   {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"location\":\"Paris\"}"},
                   {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                   {"type": "custom_tool_call", "call_id": "call_2", "name": "apply_patch", "input": "*** Begin"},
                   {"type": "custom_tool_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "ok"}]},
                   {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Done."}]},
                   {"type": "web_search_call", "id": "ws_1", "status": "completed"},
                   {"role": "developer", "content": "More."},
                   {"type": "message", "role": "user", "content": "Thanks"}]},
        {"input": [{"role": "user", "content": "w"}], "tools": RS_TOOLS, "tool_choice": {"type": "function", "name": "get_weather"},
         "max_output_tokens": 64},
        {"input": "w", "tools": RS_TOOLS, "tool_choice": "required", "stream": True, "max_output_tokens": 64, "thinking": False},
    ],
}
ANTHROPIC = ('/v1/messages', '/v1/messages/count_tokens')

# Forced answers (X-DS4-Test-Script): short, each ends with EOS, so a
# request finishes in a few tokens whatever max_tokens says.
SCRIPTS = '''=== hi
Hi.<｜end▁of▁sentence｜>
=== think
Hm.</think>Hi.<｜end▁of▁sentence｜>
=== tool
Go.</think>

<｜DSML｜tool_calls>
<｜DSML｜invoke name="get_weather">
<｜DSML｜parameter name="location" string="true">Paris</｜DSML｜parameter>
</｜DSML｜invoke>
</｜DSML｜tool_calls><｜end▁of▁sentence｜>
=== patch
</think>

<｜DSML｜tool_calls>
<｜DSML｜invoke name="apply_patch">
<｜DSML｜parameter name="input" string="true">*** Begin</｜DSML｜parameter>
</｜DSML｜invoke>
</｜DSML｜tool_calls><｜end▁of▁sentence｜>
=== args
<｜DSML｜parameter name="location" string="true">Paris</｜DSML｜parameter>
</｜DSML｜invoke>
</｜DSML｜tool_calls><｜end▁of▁sentence｜>
=== named_args
get_weather">
<｜DSML｜parameter name="location" string="true">Paris</｜DSML｜parameter>
</｜DSML｜invoke>
</｜DSML｜tool_calls><｜end▁of▁sentence｜>
=== broken
Hm.</think>

<｜DSML｜tool_calls>
<｜DSML｜invoke name="get_weather">
<｜DSML｜parameter name="location" string="true">Par<｜end▁of▁sentence｜>
'''

# ---- odd values ----------------------------------------------------------

KEYS = ["model", "messages", "role", "content", "type", "text", "name", "tools", "tool_choice", "tool_calls", "function",
        "arguments", "id", "tool_call_id", "stop", "stop_sequences", "stream", "stream_options", "include_usage", "max_tokens",
        "max_completion_tokens", "max_output_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "thinking", "think",
        "reasoning", "reasoning_effort", "reasoning_content", "effort", "output_config", "system", "input", "instructions",
        "prompt", "parameters", "input_schema", "output", "call_id", "tool_use_id", "summary", "previous_response_id",
        "budget_tokens", "format", "definition", "description", "cache_control", "", "\u00e9", "max_tokens\u0000"]
WORDS = ["user", "assistant", "system", "developer", "tool", "function", "text", "input_text", "output_text", "image_url",
         "tool_use", "tool_result", "thinking", "redacted_thinking", "message", "reasoning", "function_call",
         "function_call_output", "custom_tool_call", "custom_tool_call_output", "custom", "web_search", "auto", "none",
         "required", "any", "enabled", "disabled", "adaptive", "minimal", "low", "medium", "high", "xhigh", "max",
         "get_weather", "apply_patch", "deepseek-chat", "deepseek-reasoner", "call_1", "toolu_1", "x-anthropic-billing"]
ODD_STRINGS = [
    "", " ", "\n", "\\", "\"", "%s%s%n%x", "{}", "[]", "null", "{\"location\":", "\t\r\x01\x1f\x7f",
    "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
    "<｜DSML｜tool_calls>", "</｜DSML｜invoke>", "<｜DSML｜invoke name=\"get_weather\">", "｜", "\"<>\n",
    "é", "\u0301", "日本語", "\U0001F600", "\u202e\u200b\ufeff", "\uffff", "\U0010FFFF", "a" * 300,
]
ODD_RAW_STRINGS = [rb'"\u0000"', rb'"a\u0000b"', rb'"\ud800"', rb'"\udc00x"', rb'"\ud83d\ude00"', rb'"\ud83dx"',
                   b'"\xff\xfe"', b'"\xc3"', b'"\xc0\xaf"', b'"\xed\xa0\x80"', b'"\xf4\x90\x80\x80"', b'"caf\xc3"',
                   rb'"\\u0000"', rb'"\u00"', b'"\x00"', b'"\t"']
ODD_NUMBERS = ["0", "-0", "1", "-1", "2", "0.5", "-0.5", "1.5", "7", "1e308", "-1e308", "1e999", "-1e999", "1e-400",
               "2147483647", "2147483648", "-2147483649", "4294967296", "9223372036854775807", "18446744073709551616",
               "1e19", "1.8e19", "100000000000000000000000000000", "3.4028236e38", "-3.4028236e38", "1e39", "1e-45",
               "1000000", "999999999", "1000000001", "0.0000001", "NaN", "Infinity", "-Infinity", "01", "1.", ".5", "+1"]


class Gen:
    def __init__(self, rng):
        self.r = rng

    def string(self):
        r = self.r
        k = r.random()
        if k < 0.3:
            return r.choice(WORDS)
        if k < 0.6:
            return r.choice(ODD_STRINGS)
        if k < 0.75:
            return Raw(r.choice(ODD_RAW_STRINGS))
        if k < 0.85:
            # long: a few tokens, or far over the context (cheap to refuse: a
            # prompt near it would take seconds of prefill under ASan)
            return r.choice(["a", "ab ", "\u00e9", "｜", "<think>", "\U0001F600", "\n"]) * r.choice([40, 300, 5000, 40000])
        return ''.join(chr(r.choice([r.randrange(32, 127), r.randrange(0xa0, 0xd7ff), r.randrange(0xe000, 0x10ffff)]))
                       for _ in range(r.randrange(1, 20)))

    def number(self):
        r = self.r
        k = r.random()
        if k < 0.6:
            return Raw(r.choice(ODD_NUMBERS))
        if k < 0.8:
            return r.randrange(-5, 50)
        return r.uniform(-3, 3)

    def value(self, depth=0):
        r = self.r
        k = r.random()
        if depth > 3 or k < 0.15:
            return r.choice([None, True, False])
        if k < 0.35:
            return self.string()
        if k < 0.55:
            return self.number()
        if k < 0.75:
            return [self.value(depth + 1) for _ in range(r.randrange(0, 4))]
        return Obj([[r.choice(KEYS), self.value(depth + 1)] for _ in range(r.randrange(0, 4))])


def nodes(v, out, parent=None, slot=None):
    """Every value in the tree with where it sits: (parent, slot, value)."""
    out.append((parent, slot, v))
    if isinstance(v, Obj):
        for i, (_, x) in enumerate(v.pairs):
            nodes(x, out, v, i)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            nodes(x, out, v, i)
    return out

def put(parent, slot, v):
    if isinstance(parent, Obj):
        parent.pairs[slot][1] = v
    else:
        parent[slot] = v

def mutate(g, root, donors):
    r = g.r
    ns = nodes(root, [])
    parent, slot, v = r.choice(ns[1:] if len(ns) > 1 else ns)
    if parent is None:
        return
    op = r.randrange(13)
    if op == 0:                                   # a value of any type
        put(parent, slot, g.value())
    elif op == 1:                                 # delete the key / element
        del (parent.pairs if isinstance(parent, Obj) else parent)[slot]
    elif op == 2 and isinstance(parent, Obj):     # the key again, another value first or last
        pair = [parent.pairs[slot][0], r.choice([g.value(), copy(v)])]
        parent.pairs.insert(r.choice([slot, slot + 1, len(parent.pairs)]), pair)
    elif op == 3:                                 # wrapped in an array or an object
        put(parent, slot, r.choice([[v], [v, copy(v)], Obj([["text", v]]), Obj([["type", "text"], ["text", v]]), Obj([[r.choice(KEYS), v]])]))
    elif op == 4:                                 # deep nesting around the limit (128)
        d = r.choice([20, 100, 126, 127, 128, 129, 200])
        for _ in range(d):
            v = [v] if r.random() < 0.5 else Obj([["a", v]])
        put(parent, slot, v)
    elif op == 5:                                 # a subtree of another template (any protocol)
        put(parent, slot, copy(r.choice(donors)))
    elif op == 6 and isinstance(v, Obj):          # a known key added
        v.pairs.insert(r.randrange(len(v.pairs) + 1), [r.choice(KEYS), g.value()])
    elif op == 7 and isinstance(v, list) and v:   # elements repeated (many messages, many tools)
        n = r.choice([2, 3, 17, 100, 1000])
        put(parent, slot, (v * n)[:max(n, len(v))])
    elif op == 8 and isinstance(v, list):         # emptied
        put(parent, slot, [])
    elif op == 9:                                 # an odd string
        put(parent, slot, g.string())
    elif op == 10:                                # an odd number
        put(parent, slot, g.number())
    elif op == 11:                                # another known word (role, type, choice...)
        put(parent, slot, r.choice(WORDS))
    elif op == 12 and isinstance(parent, Obj):    # the key renamed
        parent.pairs[slot][0] = r.choice(KEYS)
    else:
        put(parent, slot, g.value())


def make_request(i):
    """Request i: (method, path, headers, body bytes, stream, tree): stream
    is whether cJSON reads "stream": true (the first of duplicate keys), None
    when the bytes were damaged. The first ones are each endpoint's first
    template as is: every endpoint answers 200 at least once, however slow
    the machine."""
    if i < len(TEMPLATES):
        path = list(TEMPLATES)[i]
        root = tree(TEMPLATES[path][0])
        return 'POST', path, {'Content-Type': 'application/json', 'X-DS4-Test-Script': 'hi'}, dump(root), False, root
    r = random.Random(SEED * 1000003 + i)
    g = Gen(r)
    k = r.random()
    if k < 0.02:
        return 'GET', r.choice(['/v1/models', '/models', '/v1/models/deepseek-chat', '/v1/models/' + r.choice(WORDS),
                                '/v1/nothing', '/health', '/v1/chat/completions']), {}, None, False, None
    path = r.choice(list(TEMPLATES))
    # The short templates twice as often: a tools prompt costs seconds of
    # prefill under ASan when its prefix is not cached.
    ts = TEMPLATES[path]
    t = r.choice(ts + [t for t in ts if 'tools' not in t])
    root = tree(t)
    donors = [n[2] for t in TEMPLATES.values() for x in t for n in nodes(tree(x), [])]
    for _ in range(r.choice([0, 1, 1, 2, 2, 3, 4, 6])):
        mutate(g, root, donors)
    if r.random() < 0.05:
        path = r.choice(list(TEMPLATES))          # a request of another protocol
    body = dump(root)
    stream = first(root, 'stream') is True and path != '/v1/messages/count_tokens'
    k = r.random()
    if k < 0.07:
        stream = None
    if k < 0.03 and body:                          # bytes cut or hit: malformed JSON
        body = body[:r.randrange(len(body))]
    elif k < 0.06 and body:
        p = r.randrange(len(body))
        body = body[:p] + bytes([r.randrange(256)]) + body[p + 1:]
    elif k < 0.07:
        body = r.choice([b'', b'null', b'[]', b'1', b'"x"', b'{}', b'{"a":1}{', b'\xef\xbb\xbf{}'])
    script = r.choice(['hi', 'hi', 'think', 'tool', 'patch', 'broken'] + (['nope'] if r.random() < 0.03 else []))
    if 'tools' in t and r.random() < 0.6:
        # A script that completes the call the template's tool_choice forces
        # (after the name, or after 'name="'), or a whole call: answers
        # with tool calls, which follow_up sends back.
        choice = json.dumps(t.get('tool_choice'))
        script = ('args' if 'get_weather' in choice else 'named_args' if 'required' in choice or 'any' in choice
                  else r.choice(['tool', 'patch']))
    headers = {'Content-Type': 'application/json', 'X-DS4-Test-Script': script}
    if body and r.random() < 0.05:
        headers['Transfer-Encoding'] = 'chunked'   # no declared length: the limit is found while reading
    method = 'POST' if r.random() > 0.01 else r.choice(['PUT', 'DELETE', 'PATCH'])
    return method, path, headers, body, stream, root


def set_first(o, key, v):
    for pair in o.pairs:
        if pair[0] == key:
            pair[1] = v
            return
    o.pairs.append([key, v])

def follow_up(i, req, raw):
    """The next turn of a conversation whose answer called tools: the
    answer's calls sent back as the protocol shows them, with results
    (replayed exactly through the server's tool-call map), then mutated a
    little. None when the answer called no tool."""
    method, path, headers, body, stream, _ = req
    r = random.Random((SEED * 1000003 + i) ^ (1 << 40))
    try:
        data = json.loads(raw)
        root = json.loads(body, object_pairs_hook=lambda p: Obj([list(x) for x in p]))
        if path == '/v1/chat/completions':
            msg = data['choices'][0]['message']
            calls = msg.get('tool_calls') or []
            msgs = first(root, 'messages')
            turn = [msg] + [{"role": "tool", "tool_call_id": c['id'], "content": "sunny"} for c in calls]
        elif path == '/v1/messages':
            uses = [b for b in data['content'] if b['type'] == 'tool_use']
            calls, msgs = uses, first(root, 'messages')
            turn = [{"role": "assistant", "content": data['content']},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": u['id'], "content": "sunny"} for u in uses]}]
        elif path == '/v1/responses':
            calls = [o for o in data['output'] if o['type'] in ('function_call', 'custom_tool_call')]
            msgs = first(root, 'input')
            if isinstance(msgs, str):
                msgs = [{"role": "user", "content": msgs}]
            turn = data['output'] + [{"type": c['type'] + '_output', "call_id": c['call_id'], "output": "ok"} for c in calls]
        else:
            return None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
    if not calls or not isinstance(msgs, list) or not isinstance(root, Obj):
        return None
    msgs = msgs + [tree(t) for t in turn]
    set_first(root, 'input' if path == '/v1/responses' else 'messages', msgs)
    g = Gen(r)
    donors = [n[2] for t in TEMPLATES.values() for x in t for n in nodes(tree(x), [])]
    for _ in range(r.choice([0, 0, 1, 2])):
        mutate(g, root, donors)
    headers = dict(headers, **{'X-DS4-Test-Script': r.choice(['hi', 'tool', 'think'])})
    return method, path, headers, dump(root), first(root, 'stream') is True, root


# ---- the oracle -----------------------------------------------------------

OK_STATUS = {200, 400, 404, 405, 413}

def check_error(path, data):
    """A JSON error body of the protocol's shape; returns a complaint or None."""
    if path in ANTHROPIC:
        if data.get('type') != 'error' or not isinstance(data.get('error'), dict):
            return 'not an Anthropic error body'
        e = data['error']
    else:
        if not isinstance(data.get('error'), dict):
            return 'not an OpenAI error body'
        e = data['error']
    if not isinstance(e.get('message'), str) or not e['message'] or not isinstance(e.get('type'), str):
        return 'error without message/type'
    return None

def bad_counts(v):
    """A token count (a key ending in _tokens) that is not a whole number in
    [0, ctx]: an unsigned subtraction gone below zero shows as 1.8e19."""
    if isinstance(v, dict):
        for k, x in v.items():
            if k.endswith('_tokens') and not isinstance(x, dict) and not (isinstance(x, int) and 0 <= x <= CTX):
                return '%s = %r' % (k, x)
            why = bad_counts(x)
            if why:
                return why
    elif isinstance(v, list):
        for x in v:
            why = bad_counts(x)
            if why:
                return why
    return None

def check_ok(path, data):
    if bad_counts(data):
        return 'a token count out of range: ' + bad_counts(data)
    if path == '/v1/chat/completions':
        ok = data.get('object') == 'chat.completion' and data['choices'][0]['message']['role'] == 'assistant'
    elif path == '/v1/completions':
        ok = data.get('object') == 'text_completion' and isinstance(data['choices'][0]['text'], str)
    elif path == '/v1/messages':
        ok = data.get('type') == 'message' and isinstance(data['content'], list) and data['content']
    elif path == '/v1/messages/count_tokens':
        ok = isinstance(data.get('input_tokens'), int) and data['input_tokens'] > 0
    elif path == '/v1/responses':
        ok = data.get('object') == 'response' and data['status'] in ('completed', 'incomplete', 'failed') and isinstance(data['output'], list)
    else:
        ok = isinstance(data, dict)
    return None if ok else 'a 200 body of the wrong shape'

def check_stream(path, text):
    """The event stream of each protocol, framed and terminated as it must be."""
    events, cur = [], {}
    for line in text.split('\n'):
        if line == '':
            if cur:
                events.append(cur)
            cur = {}
        elif line.startswith(':'):
            continue
        elif line.startswith('event: '):
            cur['event'] = line[7:]
        elif line.startswith('data: '):
            if 'data' in cur:
                return 'two data lines in one event'
            cur['data'] = line[6:]
        else:
            return 'a line that is not SSE: %r' % line[:80]
    if cur:
        return 'the stream does not end with a blank line'
    if not events:
        return 'an empty stream'
    if path in ('/v1/chat/completions', '/v1/completions'):
        if events[-1].get('data') != '[DONE]':
            return 'no [DONE] at the end'
        for e in events[:-1]:
            d = json.loads(e['data'])
            if bad_counts(d):
                return 'a token count out of range: ' + bad_counts(d)
            if 'error' not in d and d.get('object') != ('chat.completion.chunk' if 'chat' in path else 'text_completion'):
                return 'a chunk of the wrong shape'
        return None
    ds = [json.loads(e['data']) for e in events]
    for d in ds:
        if bad_counts(d):
            return 'a token count out of range: ' + bad_counts(d)
    for e, d in zip(events, ds):
        if e.get('event') != d.get('type'):
            return 'event name %r, data type %r' % (e.get('event'), d.get('type'))
    last = events[-1]['event']
    if path == '/v1/messages':
        if events[0]['event'] != 'message_start' or last not in ('message_stop', 'error'):
            return 'an Anthropic stream from %s to %s' % (events[0]['event'], last)
    else:
        if events[0]['event'] != 'response.created' or last not in ('response.completed', 'response.incomplete', 'response.failed'):
            return 'a Responses stream from %s to %s' % (events[0]['event'], last)
        if [d['sequence_number'] for d in ds] != list(range(len(ds))):
            return 'sequence numbers out of order'
    return None

def kind(v):
    if isinstance(v, Raw):
        return 'raw'                               # its type is cJSON's to decide
    if v is None:
        return 'null'
    if isinstance(v, bool):
        return 'bool'
    if isinstance(v, (int, float)):
        return 'number'
    return {str: 'string', list: 'array', Obj: 'object'}[type(v)]

def has(o, key):
    return isinstance(o, Obj) and any(k == key for k, _ in o.pairs)

def must_refuse(path, root):
    """Why the server must refuse this request (a field it checks holds a
    value of the wrong type or range), or None when it may accept it."""
    if not isinstance(root, Obj):
        return 'not an object'
    wrong = lambda key, *ok: kind(first(root, key)) not in ok + ('null', 'raw')
    for key, ok in (('model', 'string'), ('stream', 'bool'), ('seed', 'number'), ('temperature', 'number'),
                    ('top_p', 'number'), ('top_k', 'number'), ('min_p', 'number')):
        if wrong(key, ok):
            return '%s of type %s' % (key, kind(first(root, key)))
    th = first(root, 'thinking') if has(root, 'thinking') else first(root, 'think')
    if kind(th) not in ('bool', 'object', 'null', 'raw'):
        return 'thinking of type %s' % kind(th)
    maxk = {'/v1/chat/completions': ['max_completion_tokens', 'max_tokens'], '/v1/responses': ['max_output_tokens']}.get(path, ['max_tokens'])
    for key in maxk:
        v = first(root, key)
        if kind(v) in ('null', 'raw'):
            if kind(v) == 'raw':
                break
            continue
        if kind(v) != 'number' or v < 1:
            return '%s = %r' % (key, v)
        break
    stop = {'/v1/chat/completions': 'stop', '/v1/completions': 'stop', '/v1/messages': 'stop_sequences',
            '/v1/messages/count_tokens': 'stop_sequences'}.get(path)
    st = first(root, stop) if stop else None
    if kind(st) not in ('null', 'raw', 'string') and (kind(st) != 'array' or len(st) > 16 or
                                                      any(kind(x) not in ('string', 'raw') for x in st)):
        return '%s of type %s' % (stop, kind(st))
    if any(kind(x) == 'string' and len(x.encode()) > 256 for x in (st if kind(st) == 'array' else [st])):
        return '%s: an entry over 256 bytes' % stop
    if path == '/v1/completions':
        p = first(root, 'prompt')
        if isinstance(p, list) and len(p) == 1:
            p = p[0]
        return None if kind(p) in ('string', 'raw') else 'prompt of type %s' % kind(p)
    if wrong('tools', 'array'):
        return 'tools of type %s' % kind(first(root, 'tools'))
    if path == '/v1/responses':
        return None if kind(first(root, 'input')) in ('string', 'array', 'raw') else 'input of type %s' % kind(first(root, 'input'))
    msgs = first(root, 'messages')
    if kind(msgs) == 'raw':
        return None
    if kind(msgs) != 'array' or not msgs:
        return 'messages of type %s' % kind(msgs)
    for m in msgs:
        c = first(m, 'content')
        if path == '/v1/chat/completions' and kind(c) in ('number', 'bool', 'object'):
            return 'a message content of type %s' % kind(c)
        if path == '/v1/chat/completions' and kind(c) == 'array' and any(kind(x) in ('number', 'bool', 'null', 'array') for x in c):
            return 'a content part that is not a string or an object'
    return None

def judge(req, status, ctype, raw):
    """A complaint about one answer, or None."""
    method, path, headers, body, stream, root = req
    if status not in OK_STATUS:
        return 'status %d' % status
    if ctype == 'closed':
        return None                                # over --max-body: closed before the 413 could be read
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
        return 'the body is not UTF-8 (%s)' % e
    if method != 'POST' or path not in TEMPLATES:
        return None
    try:
        if status == 200 and stream is not None and must_refuse(path, root):
            return 'status 200 for a request the server must refuse: %s' % must_refuse(path, root)
        if status == 200 and ctype.startswith('text/event-stream'):
            if stream is False:
                return 'a stream for a request without "stream": true'
            return check_stream(path, text)
        data = json.loads(text)
        if status != 200:
            return check_error(path, data)
        if stream:
            return 'no stream for "stream": true'
        return check_ok(path, data)
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return 'body not as expected (%s: %s)' % (type(e).__name__, e)


# ---- running it ------------------------------------------------------------

def send(port, req):
    method, path, headers, body = req[:4]
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=LIMIT)
    try:
        try:
            if 'Transfer-Encoding' in headers:
                n = max(1, len(body) // 3)
                c.request(method, path, body=(body[k:k + n] for k in range(0, len(body), n)),
                          headers={k: v for k, v in headers.items() if k != 'Transfer-Encoding'}, encode_chunked=True)
            else:
                c.request(method, path, body=body, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            # A declared length over --max-body is answered 413 from the
            # headers, and the connection closed while the body is sent.
            if len(body or b'') <= MAX_BODY:
                raise
        try:
            resp = c.getresponse()
        except (ConnectionError, http.client.HTTPException):
            if len(body or b'') <= MAX_BODY:
                raise
            return 413, 'closed', b''
        raw = resp.read()
        return resp.status, resp.getheader('Content-Type') or '', raw
    finally:
        c.close()

def health(port):
    try:
        st, _, raw = send(port, ('GET', '/health', {}, None, False, None))
        return st == 200 and raw == b'{"status":"ok"}'
    except Exception:
        return False

def free_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    p = s.getsockname()[1]
    s.close()
    return p

SERVERS = []

def main():
    with open(os.path.join(WORK, 'scripts.txt'), 'w') as f:
        f.write(SCRIPTS)
    port = free_port()
    log = open(os.path.join(WORK, 'server.log'), 'w')
    srv = subprocess.Popen([SERVER, '-m', MODEL, '--cpu', '--threads', '1', '--ctx', str(CTX), '--port', str(port),
                            '--sessions', '8', '--max-body', str(MAX_BODY), '--keepalive', '2',
                            '--test-script', os.path.join(WORK, 'scripts.txt')], stdout=log, stderr=log)
    SERVERS.append(srv)
    print('srvfuzz: seed %d (SRVFUZZ_SEED), %gs (SRVFUZZ_TIME), %d clients, work dir %s' % (SEED, SECONDS, JOBS, WORK), flush=True)
    for _ in range(400):
        if health(port) or srv.poll() is not None:
            break
        time.sleep(0.05)

    lock = threading.Lock()
    stats = {'fast': 0, 'follow_ups': 0, 'sent': 0, 'dropped': 0, 'bad_status': 0, 'bad_body': 0, 'dead': 0}
    seen = {}                                      # (path, status) -> count
    fails = []
    deadline = time.time() + SECONDS
    # The fast lane numbers its requests apart: those it skips are not lost
    # to the other lanes.
    counters = [iter(range(1 << 40)), iter(range(1 << 40, 1 << 62))] if ONLY is None else [iter([int(ONLY)])] * 2

    def record(i, req, kind, why):
        with lock:
            stats[kind] += 1
            fails.append(i)
            if len(fails) > 20:
                return
        name = os.path.join(WORK, 'fail-%d.http' % i)
        with open(name, 'wb') as f:
            f.write(('%s %s\n' % (req[0], req[1])).encode())
            for k, v in req[2].items():
                f.write(('%s: %s\n' % (k, v)).encode())
            f.write(b'\n' + (req[3] or b''))
        body = req[3] or b''
        shown = body[:600].decode('utf-8', 'backslashreplace') + ('... (%d bytes)' % len(body) if len(body) > 600 else '')
        print('FAIL request %d (%s): %s %s [script %s]: %s\n  body: %s\n  saved: %s\n  reproduce: SRVFUZZ_SEED=%d SRVFUZZ_ONLY=%d'
              % (i, kind, req[0], req[1], req[2].get('X-DS4-Test-Script'), why, shown, name, SEED, i), flush=True)

    def exchange(i, req):
        """Send and judge one request: its answer, or None when it failed."""
        try:
            status, ctype, raw = send(port, req)
        except Exception as e:
            alive = srv.poll() is None and health(port)
            record(i, req, 'dropped' if alive else 'dead', '%s: %s' % (type(e).__name__, e))
            if not alive:
                with lock:
                    stats['dead'] += 1
            return None
        with lock:
            stats['sent'] += 1
            seen[(req[1], status)] = seen.get((req[1], status), 0) + 1
        why = judge(req, status, ctype, raw)
        if why:
            record(i, req, 'bad_status' if why.startswith('status') else 'bad_body', why + ' -- answer: ' + raw[:300].decode('utf-8', 'replace'))
            return None
        return status, ctype, raw

    def client(fast):
        """fast: the lane that never waits for a generation. Requests that
        reach the model take seconds (prefill under ASan) and all clients
        end up queued behind them; this one sends only requests that are
        refused before (a wrong type, damaged bytes) or need no generation
        (count_tokens), the rest of its numbers going unsent."""
        while time.time() < deadline or ONLY is not None:
            with lock:
                if stats['dead']:
                    return
                i = next(counters[fast], None)
            if i is None:
                return
            req = make_request(i)
            if fast and req[0] == 'POST' and req[4] is not None and req[1] != '/v1/messages/count_tokens' and not must_refuse(req[1], req[5]):
                continue
            if fast:
                with lock:
                    stats['fast'] += 1
                time.sleep(0.01)    # leaves the CPU to the generations of the other lanes
            ans = exchange(i, req)
            if ans and ans[0] == 200 and ans[1].startswith('application/json'):
                nxt = follow_up(i, req, ans[2])
                if nxt:
                    with lock:
                        stats['follow_ups'] += 1
                    exchange(i, nxt)
            if i % 50 == 0 and not stats['dead'] and not health(port):
                record(i, req, 'dead', '/health stopped answering after this request')
                with lock:
                    stats['dead'] += 1
                return

    ts = [threading.Thread(target=client, args=(k == 0 and JOBS > 1 and ONLY is None,), daemon=True)
          for k in range(JOBS if ONLY is None else 1)]
    t0 = time.time()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.time() - t0
    alive_end = srv.poll() is None and health(port)

    srv.send_signal(signal.SIGTERM)
    try:
        rc = srv.wait(30)
    except subprocess.TimeoutExpired:
        srv.kill()
        rc = 'hung (killed after 30 s)'
    log.close()
    report = open(os.path.join(WORK, 'server.log'), errors='replace').read()

    print('srvfuzz: %d requests (%d on the fast lane, %d follow-ups sending tool calls back) in %.1fs; statuses:'
          % (stats['sent'], stats['fast'], stats['follow_ups'], elapsed))
    for p in TEMPLATES:
        print('  %-28s %s' % (p, ' '.join('%d:%d' % (s, n) for (q, s), n in sorted(seen.items()) if q == p)))
    endpoints_ok = all(seen.get((p, 200)) and seen.get((p, 400)) for p in TEMPLATES)
    checks = [
        ('requests sent: %d >= %d' % (stats['sent'], MIN_REQUESTS if ONLY is None else 1), stats['sent'] >= (MIN_REQUESTS if ONLY is None else 1)),
        ('every endpoint answered both 200 and 400', endpoints_ok or ONLY is not None),
        ('no crash: /health answered throughout and at the end', not stats['dead'] and alive_end),
        ('no dropped connection or answer later than %gs' % LIMIT, not stats['dropped']),
        ('statuses valid (%s)' % ' '.join(map(str, sorted(OK_STATUS))), not stats['bad_status']),
        ('bodies valid: UTF-8, JSON of the protocol\'s shape, streams terminated', not stats['bad_body']),
        ('clean exit on SIGTERM (exit %s; ASan/UBSan/leaks exit 23)' % rc, rc == 0),
    ]
    if rc != 0 or 'ERROR: ' in report or 'runtime error' in report:
        print('---- server log (tail)')
        print(report[-6000:])
    passed = sum(1 for _, ok in checks if ok)
    for name, ok in checks:
        print('%s %s' % ('ok  ' if ok else 'FAIL', name))
    if fails:
        print('failing requests: %s%s (seed %d)' % (' '.join(map(str, fails[:20])), ' ...' if len(fails) > 20 else '', SEED))
    print('%d passed, %d failed' % (passed, len(checks) - passed))
    return 0 if passed == len(checks) else 1

if __name__ == '__main__':
    # Never leave a server behind: killed (SIGTERM) or failing, we take it down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    finally:
        for p in SERVERS:
            if p.poll() is None:
                p.kill()
