// Disk KV checkpoints through the server (issue "Sessions that survive"):
// a restart resumes a long conversation with only the new suffix prefilled
// and the same greedy continuation as an uninterrupted run; damaged or
// foreign checkpoint files are rejected with a log line and the request is
// still answered exactly; a rewind restores from the nearest checkpoint.
import OpenAI from 'openai';
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, readdirSync, readFileSync, writeFileSync, statSync, truncateSync, copyFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer, test, run, eq, ok } from './harness.mjs';

process.setMaxListeners(32);   // one exit hook per started server
const work = mkdtempSync(join(tmpdir(), 'ds4kvc-'));
process.on('exit', () => rmSync(work, { recursive: true, force: true }));
const kvdir = join(work, 'kv');
// One resident session unless a test says otherwise: eviction and rewinds
// are asserted on slot 0 (the default is sized from free memory).
const args = (dir, sessions = 1) => ['--kv-disk-dir', dir, '--kv-align', '64', '--sessions', String(sessions)];
const mk = (s) => new OpenAI({ baseURL: s.base + '/v1', apiKey: 'unused', maxRetries: 0 });
const plain = { headers: { 'X-DS4-Test-Script': 'plain' } };
const trace = (s) => readFileSync(join(s.dir, 'trace.txt'), 'utf8');

// A conversation of a few hundred tokens; the assistant's turn is scripted,
// the continuation after it is greedy (temperature 0), non-thinking.
const long = Array.from({ length: 60 }, (_, i) => `line ${i}: the quick brown fox`).join('\n');
const TURN1 = [{ role: 'user', content: long }];
const turn2 = (r1) => [...TURN1, { role: 'assistant', content: r1.choices[0].message.content },
  { role: 'user', content: 'Now summarise that.' }];
const greedy = (messages) => ({ model: 'deepseek-chat', messages, temperature: 0, max_tokens: 32 });

let ref, r1, server;

test('kvcache: reference run without a restart', async () => {
  const s = await startServer([]);
  const c = mk(s);
  const a = await c.chat.completions.create({ model: 'deepseek-chat', messages: TURN1 }, plain);
  ok(a.usage.prompt_tokens > 300, `long conversation (${a.usage.prompt_tokens} tokens)`);
  ref = await c.chat.completions.create(greedy(turn2(a)));
  eq(ref.usage.prompt_tokens_details.cached_tokens, a.usage.prompt_tokens + a.usage.completion_tokens - 1,
    'the live session continued');
  eq(ref.usage.completion_tokens, 32);
  s.stop();
});

test('kvcache: after a restart only the new suffix is prefilled, same greedy continuation', async () => {
  server = await startServer(args(kvdir));
  r1 = await mk(server).chat.completions.create({ model: 'deepseek-chat', messages: TURN1 }, plain);
  eq(r1.choices[0].message.content, 'Hello there!');
  eq(await server.term(), 0, 'clean exit (checkpoints written)');
  server = await startServer(args(kvdir));
  const r = await mk(server).chat.completions.create(greedy(turn2(r1)));
  const held = r1.usage.prompt_tokens + r1.usage.completion_tokens - 1;
  eq(r.usage.prompt_tokens_details.cached_tokens, held, 'whole previous session restored');
  eq(r.choices[0].message.content, ref.choices[0].message.content, 'continuation identical to the uninterrupted run');
  const t = trace(server);
  const m = t.match(/pool: slot 0 <- (\d+)-token prompt: 0 from memory \(held 0\), (\d+) from disk, (\d+) to prefill/);
  ok(m, 'trace logs the disk hit: ' + t);
  eq([+m[1], +m[2], +m[3]], [r.usage.prompt_tokens, held, r.usage.prompt_tokens - held], 'trace: prompt, restored, prefilled');
  ok(t.includes(`(${held} cached)`), 'generation trace agrees');
  eq(await server.term(), 0);
});

// ---- corruption suite ----------------------------------------------------------
// Each case starts from a copy of the good checkpoints with the longest one
// damaged: the request still gets the reference answer, from the shorter
// good checkpoint or from scratch, and the trace names the rejected file.
// The checkpoints on disk by their token count (header bytes 120..128).
const files = () => readdirSync(kvdir).filter((f) => f.endsWith('.kv'))
  .map((f) => ({ f, n: Number(readFileSync(join(kvdir, f)).readBigUInt64LE(120)) }));

async function damaged(name, damage, expect) {
  const dir = join(work, name);
  execFileSync('cp', ['-r', kvdir, dir]);
  // The one the restart test resumed from: the whole first session.
  const held = r1.usage.prompt_tokens + r1.usage.completion_tokens - 1;
  const big = files().find((x) => x.n === held);
  ok(big && files().some((x) => x.n < held), 'the used checkpoint and a shorter one to fall back to');
  damage(join(dir, big.f));
  const s = await startServer(args(dir));
  try {
    const r = await mk(s).chat.completions.create(greedy(turn2(r1)));
    eq(r.choices[0].message.content, ref.choices[0].message.content, name + ': exact answer');
    const cached = r.usage.prompt_tokens_details.cached_tokens;
    ok(cached > 0 && cached < held, `${name}: shorter checkpoint used (${cached} cached)`);
    const t = trace(s);
    ok(t.includes(`ds4: kv-cache: ${expect.verb} ${big.f} (${expect.why})`), `${name}: rejection logged: ${t}`);
    ok((await fetch(s.base + '/health')).ok, 'server still up');
  } finally { s.stop(); }
}

const sha = (b) => createHash('sha256').update(b).digest();

test('kvcache: a flipped body byte is rejected when loaded', async () => {
  await damaged('flip', (p) => {
    const b = readFileSync(p);
    b[b.length - 100] ^= 0x55;
    writeFileSync(p, b);
  }, { verb: 'removing', why: 'body checksum mismatch' });
});

test('kvcache: a truncated file is rejected at startup', async () => {
  await damaged('trunc', (p) => truncateSync(p, statSync(p).size - 1000),
    { verb: 'removing', why: 'truncated or lengths inconsistent with the file size' });
});

test('kvcache: a checkpoint of another format version is left alone', async () => {
  await damaged('version', (p) => {
    const b = readFileSync(p);
    b.writeUInt32LE(99, 8);
    sha(b.subarray(0, 200)).copy(b, 200);   // a well-formed header of version 99
    writeFileSync(p, b);
  }, { verb: 'ignoring', why: 'other format version' });
});

test('kvcache: a checkpoint made by another model is left alone', async () => {
  // The same conversation on a tiny model of another seed: same text, so
  // the same file name, but another model id.
  const other = join(work, 'other.gguf');
  const bin = process.env.DS4_BIN || join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'build', 'bin');
  execFileSync(join(bin, 'ds4-synth'), ['--preset', 'tiny', '--seed', '2', '-o', other], { stdio: 'ignore' });
  const odir = join(work, 'otherkv');
  const s = await startServer([...args(odir), '-m', other]);
  await mk(s).chat.completions.create({ model: 'deepseek-chat', messages: TURN1 }, plain);
  eq(await s.term(), 0);
  await damaged('foreign', (p) => copyFileSync(join(odir, p.split('/').pop()), p),
    { verb: 'ignoring', why: 'made by another model' });
});

test('kvcache: a rewind restores from the nearest checkpoint before it', async () => {
  server = await startServer(args(kvdir));
  const c = mk(server);
  // Live: the restored session plus the greedy turn. The client drops that
  // answer and sends the first turn again, a strict prefix of the session.
  await c.chat.completions.create(greedy(turn2(r1)));
  const r = await c.chat.completions.create({ model: 'deepseek-chat', messages: TURN1 }, plain);
  const cached = r.usage.prompt_tokens_details.cached_tokens;
  ok(cached >= Math.floor((r.usage.prompt_tokens - 2) / 64) * 64, `restored up to the last aligned point (${cached})`);
  ok(cached <= r.usage.prompt_tokens, 'not more than the prompt');
  // The pool's decision: an exact cut of the live session, or the disk.
  const m = [...trace(server).matchAll(/pool: slot 0 <- (\d+)-token prompt: (\d+) from memory \(held \d+\), (\d+) from disk/g)].pop();
  eq(+m[1], r.usage.prompt_tokens);
  eq(+m[2] + +m[3], cached, 'trace agrees: ' + m[0]);
  eq(r.choices[0].message.content, 'Hello there!');
});

test('kvcache: a rewind of an evicted conversation restores from disk', async () => {
  const c = mk(server);
  // Another long conversation takes the only session (the first is spilled).
  const other = [{ role: 'user', content: long.replaceAll('fox', 'dog') }];
  await c.chat.completions.create({ model: 'deepseek-chat', messages: other }, plain);
  // The first conversation without its last answer: the checkpoint at or
  // before its prompt is the last aligned point of the stable prompt.
  const r = await c.chat.completions.create({ model: 'deepseek-chat', messages: TURN1 }, plain);
  const aligned = Math.floor((r.usage.prompt_tokens - 2) / 64) * 64;
  eq(r.usage.prompt_tokens_details.cached_tokens, aligned, 'restored from the aligned checkpoint');
  const m = [...trace(server).matchAll(/pool: slot 0 <- (\d+)-token prompt: (\d+) from memory \(held \d+\), (\d+) from disk/g)].pop();
  eq([+m[1], +m[2], +m[3]], [r.usage.prompt_tokens, 0, aligned], 'trace: ' + m[0]);
  eq(r.choices[0].message.content, 'Hello there!');
});

test('kvcache: two conversations and side requests with --sessions 2: no main is prefilled again', async () => {
  const s = await startServer(args(join(work, 'two'), 2));
  try {
    const c = mk(s);
    const held = (r) => r.usage.prompt_tokens + r.usage.completion_tokens - 1;
    const next = (msgs, r, q) => [...msgs, { role: 'assistant', content: r.choices[0].message.content }, { role: 'user', content: q }];
    const side = (q) => c.chat.completions.create({ model: 'deepseek-chat', max_tokens: 4,
      messages: [{ role: 'user', content: 'Generate a short title for: ' + q }] });
    const A = TURN1, B = [{ role: 'user', content: long.replaceAll('quick', 'slow') }];
    const a1 = await c.chat.completions.create({ model: 'deepseek-chat', messages: A }, plain);
    await side('foxes');                              // takes the free slot
    const A2 = next(A, a1, 'More.');
    const a2 = await c.chat.completions.create({ model: 'deepseek-chat', messages: A2 }, plain);
    eq(a2.usage.prompt_tokens_details.cached_tokens, held(a1), 'A continued after a side request');
    const b1 = await c.chat.completions.create({ model: 'deepseek-chat', messages: B }, plain);
    // B displaced the side request, not A.
    const a3 = await c.chat.completions.create({ model: 'deepseek-chat', messages: next(A2, a2, 'Again.') }, plain);
    eq(a3.usage.prompt_tokens_details.cached_tokens, held(a2), 'A still resident');
    // With both slots taken by main conversations, a side request spills
    // one of them to disk: its next turn restores it instead of a prefill.
    await side('dogs');
    const B2 = next(B, b1, 'More.');
    const b2 = await c.chat.completions.create({ model: 'deepseek-chat', messages: B2 }, plain);
    eq(b2.usage.prompt_tokens_details.cached_tokens, held(b1), 'B continued');
    const a4 = await c.chat.completions.create({ model: 'deepseek-chat',
      messages: next(next(A2, a2, 'Again.'), a3, 'Last.') }, plain);
    eq(a4.usage.prompt_tokens_details.cached_tokens, held(a3), 'A continued');
    ok(/previous content spilled/.test(trace(s)) && / [1-9][0-9]* from disk/.test(trace(s)), 'the evicted one came back from disk');
  } finally { s.stop(); }
});

test('kvcache: a long answer is checkpointed at frontiers while it is generated', async () => {
  const s = await startServer(args(join(work, 'gen')));
  const c = mk(s);
  const q = [{ role: 'user', content: 'Write an essay.' }];
  const r = await c.chat.completions.create({ model: 'deepseek-chat', messages: q },
    { headers: { 'X-DS4-Test-Script': 'essay' } });
  ok(r.usage.completion_tokens > 290, 'a long answer');
  // Every 4 x 64 tokens of session: the frontier 256 falls inside the answer
  // (the prompt is far shorter), saved before the generation finished.
  const t = trace(s);
  const at = t.indexOf('pool: checkpoint 256 tokens'), fin = t.indexOf('finish: stop');
  ok(r.usage.prompt_tokens < 64 && at >= 0 && at < fin && /checkpoint 256 tokens[^\n]*: saved/.test(t), t);
  // A crash right after (nothing saved at exit): the next turn resumes there.
  const exited = new Promise((res) => s.proc.once('exit', res));
  s.stop();
  await exited;
  const s2 = await startServer(args(join(work, 'gen')));
  try {
    const r2 = await mk(s2).chat.completions.create({ model: 'deepseek-chat', messages: [...q,
      { role: 'assistant', content: r.choices[0].message.content }, { role: 'user', content: 'Shorter.' }] }, plain);
    eq(r2.usage.prompt_tokens_details.cached_tokens, 256, 'resumed from the frontier');
  } finally { s2.stop(); }
});

await run(() => server);
