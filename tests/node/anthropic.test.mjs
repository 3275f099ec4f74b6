// ds4-server through the real `@anthropic-ai/sdk` client: Messages, plain and
// streamed, thinking blocks, tool_use (forced DSML), tool_result replay.
import Anthropic from '@anthropic-ai/sdk';
import { startServer, test, run, eq, ok } from './harness.mjs';

const server = await startServer();
const client = new Anthropic({ baseURL: server.base, apiKey: 'unused', maxRetries: 0 });
const script = (name) => ({ headers: { 'X-DS4-Test-Script': name } });
const msgs = (text) => [{ role: 'user', content: text }];
const TOOLS = [{ name: 'get_weather', description: 'Weather for a city',
  input_schema: { type: 'object', properties: { location: { type: 'string' }, days: { type: 'integer' } }, required: ['location'] } }];
const base = { model: 'deepseek-v4-flash', max_tokens: 200 };

test('messages: thinking + text, non-streaming', async () => {
  const r = await client.messages.create({ ...base, system: 'Be brief.', messages: msgs('Hi') }, script('hello'));
  eq(r.type, 'message');
  eq(r.role, 'assistant');
  eq(r.content.map((b) => b.type), ['thinking', 'text']);
  eq(r.content[0].thinking, 'The user greets.');
  ok(r.content[0].signature.length > 0, 'signature');
  eq(r.content[1].text, 'Hello there!');
  eq(r.stop_reason, 'end_turn');
  ok(r.usage.input_tokens + r.usage.cache_read_input_tokens > 3 && r.usage.output_tokens > 5, JSON.stringify(r.usage));
});

test('messages: streamed events in order, final message', async () => {
  const st = client.messages.stream({ ...base, messages: msgs('Hi') }, script('hello'));
  const types = [];
  st.on('streamEvent', (e) => types.push(e.type));
  const m = await st.finalMessage();
  eq(m.content.map((b) => b.type), ['thinking', 'text']);
  eq(m.content[0].thinking, 'The user greets.');
  eq(m.content[1].text, 'Hello there!');
  eq(m.stop_reason, 'end_turn');
  eq(types[0], 'message_start');
  eq(types.slice(-2), ['message_delta', 'message_stop']);
  eq(types.filter((t) => t === 'content_block_start').length, 2, 'two blocks');
  eq(types.filter((t) => t === 'content_block_stop').length, 2, 'two stops');
  ok(m.usage.output_tokens > 5, 'usage from message_delta');
});

test('messages: thinking disabled -> text only', async () => {
  const r = await client.messages.create({ ...base, thinking: { type: 'disabled' }, messages: msgs('Hi') }, script('plain'));
  eq(r.content, [{ type: 'text', text: 'Hello there!' }]);
});

test('messages: stop_sequences and max_tokens', async () => {
  const r = await client.messages.create({ ...base, thinking: { type: 'disabled' }, stop_sequences: [' there'], messages: msgs('Hi') }, script('plain'));
  eq(r.content[0].text, 'Hello');
  eq(r.stop_reason, 'end_turn');
  const r2 = await client.messages.create({ ...base, max_tokens: 2, thinking: { type: 'disabled' }, messages: msgs('Hi') }, script('long'));
  eq(r2.stop_reason, 'max_tokens');
  eq(r2.usage.output_tokens, 2);
});

test('messages: tool_use, non-streaming, and tool_result replay hits the cache', async () => {
  const r = await client.messages.create({ ...base, tools: TOOLS, messages: msgs('Weather in Paris?') }, script('tool'));
  eq(r.stop_reason, 'tool_use');
  eq(r.content.map((b) => b.type), ['thinking', 'tool_use']);
  const tu = r.content[1];
  ok(/^toolu_[0-9a-f]{32}$/.test(tu.id), tu.id);
  eq(tu.name, 'get_weather');
  eq(tu.input, { location: 'Paris', days: 3 });
  const next = [...msgs('Weather in Paris?'), { role: 'assistant', content: r.content },
    { role: 'user', content: [{ type: 'tool_result', tool_use_id: tu.id, content: 'sunny, 21C' }] }];
  const r2 = await client.messages.create({ ...base, tools: TOOLS, messages: next }, script('hello'));
  eq(r2.content[1].text, 'Hello there!');
  const held = r.usage.input_tokens + r.usage.cache_read_input_tokens + r.usage.output_tokens - 1;
  eq(r2.usage.cache_read_input_tokens, held, 'cache_read_input_tokens');
});

test('messages: tool_choice tool / any force a tool_use', async () => {
  const r = await client.messages.create({ ...base, tools: TOOLS, messages: msgs('Weather?'),
    tool_choice: { type: 'tool', name: 'get_weather' } }, script('args'));
  eq(r.stop_reason, 'tool_use');
  eq(r.content.map((b) => [b.type, b.name, b.input]), [['tool_use', 'get_weather', { location: 'Paris' }]]);
  const two = [...TOOLS, { name: 'get_time', description: 'Time', input_schema: { type: 'object', properties: { zone: { type: 'string' } } } }];
  const a = await client.messages.create({ ...base, tools: two, messages: msgs('Time?'), tool_choice: { type: 'any' } },
    script('named_args'));
  eq(a.stop_reason, 'tool_use');
  eq(a.content.map((b) => b.name), ['get_time']);
});

test('messages: tool_use streamed with input_json_delta', async () => {
  const st = client.messages.stream({ ...base, tools: TOOLS, messages: msgs('Weather?') }, script('tool'));
  let partial = 0;
  st.on('streamEvent', (e) => { if (e.type === 'content_block_delta' && e.delta.type === 'input_json_delta') partial++; });
  const m = await st.finalMessage();
  eq(m.stop_reason, 'tool_use');
  const tu = m.content.find((b) => b.type === 'tool_use');
  eq(tu.input, { location: 'Paris', days: 3 });
  ok(partial > 3, 'incremental arguments');
});

test('messages: count_tokens matches the prompt of a real request', async () => {
  const body = { model: 'deepseek-v4-flash', system: [{ type: 'text', text: 'Be brief.' }], tools: TOOLS, messages: msgs('Count me') };
  const n = await client.messages.countTokens(body);
  const r = await client.messages.create({ ...body, max_tokens: 1 });
  eq(n.input_tokens, r.usage.input_tokens + r.usage.cache_read_input_tokens);
});

test('messages: thinking without tools: the shown history continues the live session', async () => {
  // The client sends the turn back without its reasoning (the template drops
  // it); the server still extends the KV state that holds it.
  const h1 = msgs('Hi there');
  const r1 = await client.messages.create({ ...base, messages: h1 }, script('hello'));
  const in1 = r1.usage.input_tokens + r1.usage.cache_read_input_tokens;
  const h2 = [...h1, { role: 'assistant', content: r1.content }, { role: 'user', content: 'More' }];
  const r2 = await client.messages.create({ ...base, messages: h2 }, script('hello'));
  eq(r2.content[1].text, 'Hello there!');
  const in2 = r2.usage.input_tokens + r2.usage.cache_read_input_tokens;
  // Everything up to the end of the shown answer was reused (more than the
  // whole first prompt, which plain token matching cannot give).
  ok(r2.usage.cache_read_input_tokens > in1, `cache_read ${r2.usage.cache_read_input_tokens} vs first prompt ${in1}`);
  ok(in2 - r2.usage.cache_read_input_tokens <= 6, `only the new turn is computed: ${JSON.stringify(r2.usage)}`);
  const h3 = [...h2, { role: 'assistant', content: r2.content }, { role: 'user', content: 'Again' }];
  const r3 = await client.messages.create({ ...base, messages: h3 }, script('hello'));
  ok(r3.usage.cache_read_input_tokens > in2, `chained: ${JSON.stringify(r3.usage)}`);
});

test('messages: error shape', async () => {
  try {
    await client.messages.create({ ...base, messages: [] });
    throw new Error('no error');
  } catch (e) {
    eq(e.status, 400);
    eq(e.error.type, 'error');
    eq(e.error.error.type, 'invalid_request_error');
  }
  try {
    await client.messages.create({ ...base, messages: msgs('hello '.repeat(5000)) });
    throw new Error('no error');
  } catch (e) {
    eq(e.status, 400);
    ok(/context length/.test(e.error.error.message), e.message);
  }
});

await run(server);
