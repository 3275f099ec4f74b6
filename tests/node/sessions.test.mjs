// Several resident sessions and disk KV checkpoints, seen from a client:
// two interleaved conversations each keep their cache, and a restarted
// server resumes a conversation from its checkpoint.
import OpenAI from 'openai';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startServer, test, run, eq, ok } from './harness.mjs';

const kvdir = mkdtempSync(join(tmpdir(), 'ds4kv-'));
process.on('exit', () => rmSync(kvdir, { recursive: true, force: true }));
const args = ['--sessions', '2', '--kv-disk-dir', kvdir, '--kv-align', '64'];
let server = await startServer(args);
let client = new OpenAI({ baseURL: server.base + '/v1', apiKey: 'unused', maxRetries: 0 });
const script = (name) => ({ headers: { 'X-DS4-Test-Script': name } });
const TOOLS = [{ type: 'function', function: { name: 'get_weather', description: 'Weather for a city',
  parameters: { type: 'object', properties: { location: { type: 'string' }, days: { type: 'integer' } } } } }];

const A1 = [{ role: 'user', content: 'Weather in Paris?' }];
let a1, a2, followA;

test('sessions: interleaved thinking chats each continue their live session (both slots free)', async () => {
  const conv = (sys) => [{ role: 'system', content: sys }, { role: 'user', content: 'Hi' }];
  const c1 = await client.chat.completions.create({ model: 'x', messages: conv('You are C.') }, script('hello'));
  const d1 = await client.chat.completions.create({ model: 'x', messages: conv('You are D, another one.') }, script('hello'));
  const next = (sys, r) => [...conv(sys), { role: 'assistant', content: r.choices[0].message.content }, { role: 'user', content: 'More' }];
  const c2 = await client.chat.completions.create({ model: 'x', messages: next('You are C.', c1) }, script('hello'));
  const d2 = await client.chat.completions.create({ model: 'x', messages: next('You are D, another one.', d1) }, script('hello'));
  // Reasoning is dropped from the shown history, yet each reuses its whole
  // previous turn (more than its whole first prompt).
  ok(c2.usage.prompt_tokens_details.cached_tokens > c1.usage.prompt_tokens, JSON.stringify(c2.usage));
  ok(d2.usage.prompt_tokens_details.cached_tokens > d1.usage.prompt_tokens, JSON.stringify(d2.usage));
});

test('sessions: two interleaved conversations keep their own cache', async () => {
  a1 = await client.chat.completions.create({ model: 'x', messages: A1, tools: TOOLS }, script('tool'));
  const tc = a1.choices[0].message.tool_calls[0];
  // Another conversation (different system prompt) in between.
  const b = await client.chat.completions.create({ model: 'deepseek-chat', max_tokens: 3,
    messages: [{ role: 'system', content: 'You are a pirate.' }, { role: 'user', content: 'Ahoy' }] });
  eq(b.choices[0].finish_reason, 'length');
  // Arguments sent back reordered: only the remembered block renders the
  // bytes the model wrote.
  const back = { ...tc, function: { name: tc.function.name, arguments: '{"days": 3, "location": "Paris"}' } };
  followA = [...A1, { role: 'assistant', content: null, reasoning_content: a1.choices[0].message.reasoning_content,
    tool_calls: [back] }, { role: 'tool', tool_call_id: tc.id, content: 'sunny' }];
  a2 = await client.chat.completions.create({ model: 'x', messages: followA, tools: TOOLS }, script('hello'));
  eq(a2.usage.prompt_tokens_details.cached_tokens, a1.usage.prompt_tokens + a1.usage.completion_tokens - 1,
    'conversation A resumed where it was');
});

test('sessions: a restarted server resumes from its disk checkpoint, tool calls included', async () => {
  eq(await server.term(), 0, 'clean exit (checkpoints and tool map written)');
  server = await startServer(args);
  client = new OpenAI({ baseURL: server.base + '/v1', apiKey: 'unused', maxRetries: 0 });
  // The next turn of conversation A: its prefix is the checkpoint of the
  // whole session written at shutdown, which includes the replayed block.
  const next = [...followA, { role: 'assistant', content: a2.choices[0].message.content,
    reasoning_content: a2.choices[0].message.reasoning_content }, { role: 'user', content: 'Thanks' }];
  const r = await client.chat.completions.create({ model: 'x', messages: next, tools: TOOLS }, script('hello'));
  eq(r.choices[0].message.content, 'Hello there!');
  eq(r.usage.prompt_tokens_details.cached_tokens, a2.usage.prompt_tokens + a2.usage.completion_tokens - 1,
    'restored from disk');
});

test('sessions: after a crash (SIGKILL) tool calls still replay from the checkpoints\' maps', async () => {
  const C1 = [{ role: 'user', content: 'Weather in Paris, please?' }];
  const c1 = await client.chat.completions.create({ model: 'x', messages: C1, tools: TOOLS }, script('tool'));
  const tc = c1.choices[0].message.tool_calls[0];
  const back = { ...tc, function: { name: tc.function.name, arguments: '{"days": 3, "location": "Paris"}' } };
  // A long tool result: prefill checkpoints land well past the call block.
  const result = Array.from({ length: 40 }, (_, i) => `hour ${i}: sunny, 20 C`).join('\n');
  const followC = [...C1, { role: 'assistant', content: null, reasoning_content: c1.choices[0].message.reasoning_content,
    tool_calls: [back] }, { role: 'tool', tool_call_id: tc.id, content: result }];
  const c2 = await client.chat.completions.create({ model: 'x', messages: followC, tools: TOOLS }, script('hello'));
  const exited = new Promise((res) => server.proc.once('exit', res));
  server.stop();                                  // SIGKILL: nothing written at shutdown
  await exited;
  server = await startServer(args);
  client = new OpenAI({ baseURL: server.base + '/v1', apiKey: 'unused', maxRetries: 0 });
  const next = [...followC, { role: 'assistant', content: c2.choices[0].message.content,
    reasoning_content: c2.choices[0].message.reasoning_content }, { role: 'user', content: 'Thanks' }];
  const r = await client.chat.completions.create({ model: 'x', messages: next, tools: TOOLS }, script('hello'));
  // The reordered arguments render the sampled block only through the map;
  // without it the prefix would break inside the block.
  const pastBlock = c1.usage.prompt_tokens + c1.usage.completion_tokens;
  const cached = r.usage.prompt_tokens_details.cached_tokens;
  ok(cached > pastBlock && cached % 64 === 0, `restored past the call block (${cached} > ${pastBlock})`);
});

await run(() => server);
