// ds4-server through the real `openai` client: Chat Completions, legacy
// Completions, Responses, models, tool calls (forced DSML), exact replay.
import OpenAI from 'openai';
import { startServer, test, run, eq, ok } from './harness.mjs';

const server = await startServer();
const client = new OpenAI({ baseURL: server.base + '/v1', apiKey: 'unused', maxRetries: 0 });
const script = (name) => ({ headers: { 'X-DS4-Test-Script': name } });
const user = (content) => [{ role: 'user', content }];
const TOOLS = [
  { type: 'function', function: { name: 'get_weather', description: 'Weather for a city',
    parameters: { type: 'object', properties: { location: { type: 'string' }, days: { type: 'integer' } }, required: ['location'] } } },
  { type: 'function', function: { name: 'get_time', description: 'Time in a zone',
    parameters: { type: 'object', properties: { zone: { type: 'string' } } } } },
];

test('chat: reasoning and content, non-streaming', async () => {
  const r = await client.chat.completions.create({ model: 'deepseek-v4-flash', messages: user('Hi') }, script('hello'));
  const m = r.choices[0].message;
  eq(m.content, 'Hello there!', 'content');
  eq(m.reasoning_content, 'The user greets.', 'reasoning');
  eq(r.choices[0].finish_reason, 'stop');
  ok(r.usage.prompt_tokens > 3 && r.usage.completion_tokens > 5, 'usage ' + JSON.stringify(r.usage));
  ok(typeof r.usage.prompt_tokens_details.cached_tokens === 'number', 'cached_tokens');
});

test('chat: streaming deltas, role first, usage chunk', async () => {
  const s = await client.chat.completions.create({ model: 'deepseek-v4-flash', messages: user('Hi'), stream: true,
    stream_options: { include_usage: true } }, script('hello'));
  let content = '', reasoning = '', first = null, finish = null, usage = null, n = 0;
  for await (const c of s) {
    if (!first) first = c;
    n++;
    if (c.usage) usage = c.usage;
    const ch = c.choices[0];
    if (!ch) continue;
    content += ch.delta.content || '';
    reasoning += ch.delta.reasoning_content || '';
    if (ch.finish_reason) finish = ch.finish_reason;
  }
  eq(first.choices[0].delta.role, 'assistant', 'role chunk');
  eq(content, 'Hello there!');
  eq(reasoning, 'The user greets.');
  eq(finish, 'stop');
  ok(n > 6, 'several chunks');
  ok(usage && usage.completion_tokens > 5, 'usage chunk');
});

test('chat: deepseek-chat alias turns thinking off', async () => {
  const r = await client.chat.completions.create({ model: 'deepseek-chat', messages: user('Hi') }, script('plain'));
  eq(r.choices[0].message.content, 'Hello there!');
  eq(r.choices[0].message.reasoning_content, undefined, 'no reasoning');
});

test('chat: stop string cuts the text (plain and streamed)', async () => {
  const body = { model: 'deepseek-chat', messages: user('Hi'), stop: [' there', 'zzz'] };
  const r = await client.chat.completions.create(body, script('plain'));
  eq(r.choices[0].message.content, 'Hello');
  eq(r.choices[0].finish_reason, 'stop');
  let content = '';
  for await (const c of await client.chat.completions.create({ ...body, stream: true }, script('plain')))
    content += c.choices[0]?.delta.content || '';
  eq(content, 'Hello');
});

test('chat: max_tokens -> length', async () => {
  const r = await client.chat.completions.create({ model: 'deepseek-chat', messages: user('Hi'), max_tokens: 3 }, script('long'));
  eq(r.choices[0].finish_reason, 'length');
  eq(r.usage.completion_tokens, 3);
  eq(r.choices[0].message.content, 'word word word');
});

test('chat: greedy and seeded sampling reproduce; bad types are 400', async () => {
  const body = { model: 'deepseek-chat', messages: user('Tell me'), max_tokens: 4 };
  const g1 = await client.chat.completions.create({ ...body, temperature: 0 });
  const g2 = await client.chat.completions.create({ ...body, temperature: 0 });
  eq(g1.choices[0].message.content, g2.choices[0].message.content, 'greedy');
  const s1 = await client.chat.completions.create({ ...body, temperature: 1, seed: 42 });
  const s2 = await client.chat.completions.create({ ...body, temperature: 1, seed: 42 });
  eq(s1.choices[0].message.content, s2.choices[0].message.content, 'seeded');
  for (const bad of [{ temperature: 'hot' }, { seed: -1 }, { top_p: 0 }]) {
    try {
      await client.chat.completions.create({ ...body, ...bad });
      throw new Error('accepted ' + JSON.stringify(bad));
    } catch (e) { eq(e.status, 400, JSON.stringify(bad)); }
  }
});

test('chat: tool call, non-streaming', async () => {
  const r = await client.chat.completions.create({ model: 'deepseek-v4-flash', messages: user('Weather in Paris?'), tools: TOOLS }, script('tool'));
  const ch = r.choices[0];
  eq(ch.finish_reason, 'tool_calls');
  eq(ch.message.content, null, 'content');
  eq(ch.message.reasoning_content, 'Call it.');
  eq(ch.message.tool_calls.length, 1);
  const tc = ch.message.tool_calls[0];
  ok(/^call_[0-9a-f]{32}$/.test(tc.id), 'id ' + tc.id);
  eq(tc.type, 'function');
  eq(tc.function.name, 'get_weather');
  eq(JSON.parse(tc.function.arguments), { location: 'Paris', days: 3 });
});

test('chat: tool call, streamed as it is recognised', async () => {
  const s = await client.chat.completions.create({ model: 'deepseek-v4-flash', messages: user('Weather?'), tools: TOOLS, stream: true }, script('tool'));
  const calls = [];
  let finish = null, argChunks = 0;
  for await (const c of s) {
    const ch = c.choices[0];
    if (!ch) continue;
    for (const d of ch.delta.tool_calls || []) {
      if (d.id) calls[d.index] = { id: d.id, name: d.function.name, args: '' };
      else { calls[d.index].args += d.function.arguments; argChunks++; }
    }
    if (ch.finish_reason) finish = ch.finish_reason;
  }
  eq(finish, 'tool_calls');
  eq(calls.length, 1);
  eq(calls[0].name, 'get_weather');
  eq(JSON.parse(calls[0].args), { location: 'Paris', days: 3 });
  ok(argChunks > 3, 'arguments arrive incrementally');
});

test('chat: parallel calls, thinking off', async () => {
  const r = await client.chat.completions.create({ model: 'deepseek-chat', messages: user('Both?'), tools: TOOLS }, script('tool2'));
  const tcs = r.choices[0].message.tool_calls;
  eq(tcs.map((t) => t.function.name), ['get_weather', 'get_time']);
  eq(JSON.parse(tcs[1].function.arguments), { zone: 'UTC' });
  ok(tcs[0].id !== tcs[1].id, 'distinct ids');
});

test('chat: replayed tool call extends the live session exactly', async () => {
  const msgs = user('Weather in Paris?');
  const r1 = await client.chat.completions.create({ model: 'deepseek-v4-flash', messages: msgs, tools: TOOLS }, script('tool'));
  const tc = r1.choices[0].message.tool_calls[0];
  // Keys reordered on purpose: the stored DSML block is replayed, not the JSON.
  const replay = [...msgs,
    { role: 'assistant', content: null, reasoning_content: r1.choices[0].message.reasoning_content,
      tool_calls: [{ id: tc.id, type: 'function', function: { name: 'get_weather', arguments: '{"days": 3, "location": "Paris"}' } }] },
    { role: 'tool', tool_call_id: tc.id, content: '{"temp": 21}' }];
  const r2 = await client.chat.completions.create({ model: 'deepseek-v4-flash', messages: replay, tools: TOOLS }, script('hello'));
  eq(r2.choices[0].message.content, 'Hello there!');
  // The session held the prompt and every generated token but the last.
  eq(r2.usage.prompt_tokens_details.cached_tokens, r1.usage.prompt_tokens + r1.usage.completion_tokens - 1, 'cached');
});

// tool_choice that demands a call: the server forces the DSML opening (and
// the name); the test script only supplies what the model writes after it,
// so a call comes out only if the server forced the rest.
test('chat: tool_choice naming a function forces a call of it (after an empty reasoning)', async () => {
  const msgs = user('Weather in Lyon?');
  const r = await client.chat.completions.create({ model: 'deepseek-v4-flash', messages: msgs, tools: TOOLS,
    tool_choice: { type: 'function', function: { name: 'get_weather' } } }, script('args'));
  const ch = r.choices[0];
  eq(ch.finish_reason, 'tool_calls');
  eq(ch.message.tool_calls.map((t) => [t.function.name, JSON.parse(t.function.arguments)]), [['get_weather', { location: 'Paris' }]]);
  ok(!ch.message.reasoning_content, 'the forced </think> leaves no reasoning');
  // The thinking conversation goes on from the live session: the forced
  // turn renders back to exactly the tokens generated.
  const tc = ch.message.tool_calls[0];
  const next = await client.chat.completions.create({ model: 'deepseek-v4-flash', tools: TOOLS, messages: [...msgs,
    { role: 'assistant', content: null, tool_calls: [tc] }, { role: 'tool', tool_call_id: tc.id, content: 'rain' }] }, script('hello'));
  eq(next.usage.prompt_tokens_details.cached_tokens, r.usage.prompt_tokens + r.usage.completion_tokens - 1, 'whole turn reused');
  // Streamed too: the name comes first, from the forced tokens.
  const s = await client.chat.completions.create({ model: 'deepseek-v4-flash', messages: user('Weather?'), tools: TOOLS,
    tool_choice: { type: 'function', function: { name: 'get_weather' } }, stream: true }, script('args'));
  let name = '', finish = null;
  for await (const c of s) {
    for (const d of c.choices[0]?.delta?.tool_calls || []) if (d.function?.name) name += d.function.name;
    if (c.choices[0]?.finish_reason) finish = c.choices[0].finish_reason;
  }
  eq([name, finish], ['get_weather', 'tool_calls']);
});

test('chat: tool_choice required forces a call; the model picks the tool', async () => {
  const r = await client.chat.completions.create({ model: 'deepseek-v4-flash', messages: user('Time?'), tools: TOOLS,
    tool_choice: 'required' }, script('named_args'));
  eq(r.choices[0].finish_reason, 'tool_calls');
  eq(r.choices[0].message.tool_calls.map((t) => t.function.name), ['get_time']);
  // Without the forced opening the same script is plain text.
  const p = await client.chat.completions.create({ model: 'deepseek-chat', messages: user('Time?'), tools: TOOLS },
    script('named_args'));
  ok(p.choices[0].finish_reason !== 'tool_calls' && !(p.choices[0].message.tool_calls || []).length, 'no call without tool_choice');
});

test('chat: tool_choice naming an unknown tool, or required without tools: 400', async () => {
  for (const body of [{ tools: TOOLS, tool_choice: { type: 'function', function: { name: 'nope' } } },
    { tool_choice: 'required' }]) {
    const res = await fetch(server.base + '/v1/chat/completions', { method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'x', messages: user('x'), ...body }) });
    eq(res.status, 400, JSON.stringify(body));
    ok(/tool/.test((await res.json()).error.message));
  }
});

test('chat: tool_choice none drops the tools (no call recognised)', async () => {
  const r = await client.chat.completions.create({ model: 'deepseek-chat', messages: user('x'), tools: TOOLS, tool_choice: 'none' }, script('broken'));
  eq(r.choices[0].finish_reason, 'stop');
  eq(r.choices[0].message.tool_calls, undefined);
  ok(r.choices[0].message.content.includes('invoke name="get_weather"'), 'DSML stays text');
});

test('chat: unterminated tool block -> finish error', async () => {
  const r = await client.chat.completions.create({ model: 'deepseek-chat', messages: user('x'), tools: TOOLS }, script('broken'));
  eq(r.choices[0].finish_reason, 'error');
});

test('chat: context length error shape', async () => {
  try {
    await client.chat.completions.create({ model: 'x', messages: user('hello '.repeat(5000)) });
    throw new Error('no error');
  } catch (e) {
    eq(e.status, 400);
    eq(e.code, 'context_length_exceeded');
    eq(e.type, 'invalid_request_error');
  }
});

test('chat: bad reasoning_effort -> 400', async () => {
  try {
    await client.chat.completions.create({ model: 'x', messages: user('x'), reasoning_effort: 'bogus' });
    throw new Error('no error');
  } catch (e) { eq(e.status, 400); ok(/effort/.test(e.message), e.message); }
});

test('completions: plain and streamed', async () => {
  const r = await client.completions.create({ model: 'x', prompt: 'Say hi' }, script('plain'));
  eq(r.object, 'text_completion');
  eq(r.choices[0].text, 'Hello there!');
  eq(r.choices[0].finish_reason, 'stop');
  let text = '';
  for await (const c of await client.completions.create({ model: 'x', prompt: 'Say hi', stream: true }, script('plain')))
    text += c.choices[0]?.text || '';
  eq(text, 'Hello there!');
});

test('responses: message with reasoning, non-streaming', async () => {
  const r = await client.responses.create({ model: 'x', input: 'Hi' }, script('hello'));
  eq(r.status, 'completed');
  eq(r.output_text, 'Hello there!');
  eq(r.output.map((o) => o.type), ['reasoning', 'message']);
  eq(r.output[0].content[0].text, 'The user greets.');
  ok(r.usage.input_tokens > 3, 'usage');
});

test('responses: streamed events and final response', async () => {
  const st = client.responses.stream({ model: 'x', input: [{ role: 'user', content: 'Hi' }] }, script('hello'));
  const types = [];
  let text = '';
  for await (const e of st) {
    types.push(e.type);
    if (e.type === 'response.output_text.delta') text += e.delta;
  }
  const fin = await st.finalResponse();
  eq(text, 'Hello there!');
  eq(types[0], 'response.created');
  eq(types[types.length - 1], 'response.completed');
  ok(types.includes('response.reasoning_text.delta') && types.includes('response.output_item.done'), types.join(','));
  eq(fin.output[1].content[0].text, 'Hello there!');
  const seq = [];
  for (const t of types) if (!seq.includes(t)) seq.push(t);
  ok(seq.indexOf('response.output_item.added') < seq.indexOf('response.content_part.added'), 'item before part');
});

test('responses: tool_choice naming a function forces its call', async () => {
  const tools = [{ type: 'function', name: 'get_weather', parameters: TOOLS[0].function.parameters },
    { type: 'function', name: 'get_time', parameters: TOOLS[1].function.parameters }];
  const r = await client.responses.create({ model: 'x', input: 'Weather?', tools,
    tool_choice: { type: 'function', name: 'get_weather' } }, script('args'));
  eq(r.output.filter((o) => o.type === 'function_call').map((o) => [o.name, JSON.parse(o.arguments)]),
    [['get_weather', { location: 'Paris' }]]);
});

test('responses: function call and its replay', async () => {
  const tools = [{ type: 'function', name: 'get_weather', parameters: TOOLS[0].function.parameters }];
  const r = await client.responses.create({ model: 'x', input: 'Weather?', tools }, script('tool'));
  const fc = r.output.find((o) => o.type === 'function_call');
  eq(fc.name, 'get_weather');
  eq(JSON.parse(fc.arguments), { location: 'Paris', days: 3 });
  const input = [{ role: 'user', content: 'Weather?' }, ...r.output,
    { type: 'function_call_output', call_id: fc.call_id, output: 'sunny' }];
  const r2 = await client.responses.create({ model: 'x', input, tools }, script('hello'));
  eq(r2.output_text, 'Hello there!');
  eq(r2.usage.input_tokens_details.cached_tokens, r.usage.input_tokens + r.usage.output_tokens - 1, 'cached');
  // Streamed: arguments arrive as deltas of a function_call item.
  let args = '';
  for await (const e of client.responses.stream({ model: 'x', input: 'Weather?', tools }, script('tool')))
    if (e.type === 'response.function_call_arguments.delta') args += e.delta;
  eq(JSON.parse(args), { location: 'Paris', days: 3 });
});

test('responses: custom (freeform) tool call, plain, streamed and replayed', async () => {
  const tools = [{ type: 'custom', name: 'apply_patch', description: 'Edit files', format: { type: 'text' } }];
  const body = { model: 'x', input: 'Patch it', tools, reasoning: { effort: 'none' } };
  const r = await client.responses.create(body, script('patch'));
  eq(r.output.map((o) => o.type), ['custom_tool_call']);
  eq(r.output[0].name, 'apply_patch');
  eq(r.output[0].input, '*** Begin Patch\nx\n*** End Patch');
  const types = [];
  let fin = null;
  for await (const e of client.responses.stream(body, script('patch'))) {
    types.push(e.type);
    if (e.type === 'response.completed') fin = e.response;
  }
  ok(types.includes('response.custom_tool_call_input.delta'), types.join(','));
  eq(fin.output[0].input, '*** Begin Patch\nx\n*** End Patch');
  const input = [{ role: 'user', content: 'Patch it' }, ...fin.output,
    { type: 'custom_tool_call_output', call_id: fin.output[0].call_id, output: 'Done!' }];
  const r2 = await client.responses.create({ ...body, input }, script('plain'));
  eq(r2.output_text, 'Hello there!');
  eq(r2.usage.input_tokens_details.cached_tokens, fin.usage.input_tokens + fin.usage.output_tokens - 1, 'cached');
});

test('models: list and retrieve', async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  ok(ids.includes('deepseek-v4-flash') && ids.includes('deepseek-chat'), ids.join(','));
  eq((await client.models.retrieve('deepseek-reasoner')).id, 'deepseek-reasoner');
});

await run(server);
