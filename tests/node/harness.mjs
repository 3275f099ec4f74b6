// Shared by the ds4-server node tests: starts a real ds4-server on a free
// loopback port with the tiny model, runs named tests, prints the summary
// line tests/run.sh sums ("N passed, N failed") and stops the server.
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, writeFileSync, existsSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import net from 'node:net';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const bin = process.env.DS4_BIN || join(root, 'build', 'bin');

// Forced-token scripts (ds4-server --test-script): the text is pushed
// through the real sampler, detokenizer, DSML parser and streamers.
export const SCRIPTS = {
  hello: 'The user greets.</think>Hello there!<｜end▁of▁sentence｜>',
  plain: 'Hello there!<｜end▁of▁sentence｜>',
  tool: 'Call it.</think>\n\n<｜DSML｜tool_calls>\n' +
    '<｜DSML｜invoke name="get_weather">\n' +
    '<｜DSML｜parameter name="location" string="true">Paris</｜DSML｜parameter>\n' +
    '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n' +
    '</｜DSML｜invoke>\n</｜DSML｜tool_calls>',
  // Two parallel calls, non-thinking (the prompt ends with </think>).
  tool2: '\n\n<｜DSML｜tool_calls>\n' +
    '<｜DSML｜invoke name="get_weather">\n' +
    '<｜DSML｜parameter name="location" string="true">Oslo</｜DSML｜parameter>\n' +
    '</｜DSML｜invoke>\n' +
    '<｜DSML｜invoke name="get_time">\n' +
    '<｜DSML｜parameter name="zone" string="true">UTC</｜DSML｜parameter>\n' +
    '</｜DSML｜invoke>\n</｜DSML｜tool_calls>',
  // A freeform (Responses "custom") tool: one string parameter "input".
  patch: '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="apply_patch">\n' +
    '<｜DSML｜parameter name="input" string="true">*** Begin Patch\nx\n*** End Patch</｜DSML｜parameter>\n' +
    '</｜DSML｜invoke>\n</｜DSML｜tool_calls>',
  // An opened block that never closes: finish "error".
  broken: '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="location" string="true">Par<｜end▁of▁sentence｜>',
  long: 'word '.repeat(40) + '<｜end▁of▁sentence｜>',
  // What follows a forced tool_choice opening: after the name (named tool),
  // or from the name on ("required" / "any").
  args: '<｜DSML｜parameter name="location" string="true">Paris</｜DSML｜parameter>\n' +
    '</｜DSML｜invoke>\n</｜DSML｜tool_calls>',
  named_args: 'get_time">\n<｜DSML｜parameter name="zone" string="true">UTC</｜DSML｜parameter>\n' +
    '</｜DSML｜invoke>\n</｜DSML｜tool_calls>',
  // A long answer: crosses generation checkpoint frontiers.
  essay: 'word '.repeat(300) + '<｜end▁of▁sentence｜>',
};

function freePort() {
  return new Promise((res, rej) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => res(p)); });
    s.on('error', rej);
  });
}

export async function startServer(extra = []) {
  const dir = mkdtempSync(join(tmpdir(), 'ds4srv-'));
  let model = process.env.DS4_TINY;
  if (!model || !existsSync(model)) {
    model = join(dir, 'tiny.gguf');
    execFileSync(join(bin, 'ds4-synth'), ['--preset', 'tiny', '--seed', '1', '-o', model], { stdio: 'ignore' });
  }
  const script = join(dir, 'scripts.txt');
  writeFileSync(script, Object.entries(SCRIPTS).map(([k, v]) => `=== ${k}\n${v}\n`).join(''));
  const port = await freePort();
  const args = ['-m', model, '--cpu', '--threads', '1', '--ctx', '4096', '--port', String(port),
    '--keepalive', '1', '--test-script', script, '--trace', join(dir, 'trace.txt'), ...extra];
  const proc = spawn(join(bin, 'ds4-server'), args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  proc.stderr.on('data', (d) => { log += d; });
  const kill = () => { try { proc.kill('SIGKILL'); } catch {} };
  process.on('exit', () => { kill(); rmSync(dir, { recursive: true, force: true }); });
  const base = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 200; i++) {
    if (proc.exitCode !== null) throw new Error('ds4-server exited: ' + log);
    const term = () => new Promise((res) => { proc.once('exit', (code) => res(code)); proc.kill('SIGTERM'); });
    try { if ((await fetch(base + '/health')).ok) return { base, proc, dir, log: () => log, stop: kill, term }; } catch {}
    await new Promise((r) => setTimeout(r, 50));
  }
  kill();
  throw new Error('ds4-server did not come up: ' + log);
}

const tests = [];
export function test(name, fn) { tests.push([name, fn]); }

export function eq(a, b, what = '') {
  const ja = JSON.stringify(a), jb = JSON.stringify(b);
  if (ja !== jb) throw new Error(`${what} expected ${jb}, got ${ja}`);
}
export function ok(c, what) { if (!c) throw new Error(what || 'assertion failed'); }

// server: the server to check and stop at the end, or a function giving it
// (for a test that restarts the server).
export async function run(serverOrFn) {
  let passed = 0, failed = 0;
  for (const [name, fn] of tests) {
    const t0 = Date.now();
    try {
      await fn();
      passed++;
      console.log(`ok   ${name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
    } catch (e) {
      failed++;
      console.log(`FAIL ${name}: ${e && e.stack || e}`);
    }
  }
  const server = typeof serverOrFn === 'function' ? serverOrFn() : serverOrFn;
  // Every test above must have left the server alive.
  if (server && server.proc.exitCode !== null) { failed++; console.log('FAIL server died: ' + server.log()); }
  if (server) server.stop();
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}
