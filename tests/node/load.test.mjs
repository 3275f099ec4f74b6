// Bounded loopback load: 8 concurrent clients x 5 requests against a server
// with a short queue. Every request is answered (200) or cleanly refused
// (503 in the protocol's error shape); the server survives and still serves.
import OpenAI from 'openai';
import { startServer, test, run, eq, ok } from './harness.mjs';

const server = await startServer(['--queue', '3']);
const client = new OpenAI({ baseURL: server.base + '/v1', apiKey: 'unused', maxRetries: 0 });

test('load: 8 x 5 requests, all answered or refused with 503', async () => {
  const outcomes = { ok: 0, busy: 0, other: [] };
  const worker = async (w) => {
    for (let i = 0; i < 5; i++) {
      const stream = (w + i) % 2 === 0;
      try {
        const body = { model: 'deepseek-chat', messages: [{ role: 'user', content: `client ${w} request ${i}` }], max_tokens: 2, stream };
        if (stream) {
          let fin = null;
          for await (const c of await client.chat.completions.create(body)) fin = c.choices[0]?.finish_reason || fin;
          if (fin !== 'length' && fin !== 'stop') throw new Error('finish ' + fin);
        } else {
          const r = await client.chat.completions.create(body);
          eq(r.usage.completion_tokens <= 2, true, 'max_tokens');
        }
        outcomes.ok++;
      } catch (e) {
        if (e.status === 503 && e.type === 'server_error') outcomes.busy++;
        else outcomes.other.push(String(e));
      }
    }
  };
  await Promise.all(Array.from({ length: 8 }, (_, w) => worker(w)));
  eq(outcomes.other, [], 'unexpected failures');
  eq(outcomes.ok + outcomes.busy, 40, 'all accounted for');
  ok(outcomes.ok >= 4, `some served (${outcomes.ok} ok, ${outcomes.busy} busy)`);
  console.log(`   ${outcomes.ok} served, ${outcomes.busy} refused`);
});

test('load: server still answers afterwards', async () => {
  const r = await client.chat.completions.create({ model: 'deepseek-chat', messages: [{ role: 'user', content: 'x' }], max_tokens: 1 });
  eq(r.choices[0].finish_reason, 'length');
});

// Last: a clean SIGTERM exit. Under tests/asan.sh the server is an
// ASan/LSan build, so a leak or memory error after this load fails here.
test('load: SIGTERM after the load exits 0 (no leak reports)', async () => {
  const code = await server.term();
  eq(code, 0, 'exit code (log: ' + server.log().slice(-2000) + ')');
});

await run(null);
