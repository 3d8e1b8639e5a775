// @ts-check
/**
 * The installable package, as a consumer meets it: `npm pack`, then a
 * scratch app installs the tarball (with rxjs as its own peer dependency)
 * and uses it against a real taskstream: from Node ESM and CJS with the
 * `eventsource` polyfill, bundled by esbuild, and type-checked by a strict
 * `tsc` that reads only the shipped declarations. Run by `npm run e2e`.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { WEB_DIR, serverBinary, startServer } from './harness.mjs';

/** @param {string} cmd @param {string[]} args @param {string} cwd */
const run = (cmd, args, cwd) => execFileSync(cmd, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 120_000 });

describe('the taskstream-client package from npm pack', () => {
  /** @type {string} */
  let tmp;
  /** @type {string} */
  let app;
  /** @type {Array<{ path: string }>} */
  let files = [];
  /** @type {import('./harness.mjs').Server} */
  let server;

  before(async () => {
    tmp = mkdtempSync(path.join(os.tmpdir(), 'taskstream-pack-'));
    // prepack builds lib/ (ESM, CJS, declarations) first.
    const out = run('npm', ['pack', '--json', '--pack-destination', tmp], WEB_DIR);
    // The prepack build prints to stdout too; npm's JSON is the last part.
    const packed = JSON.parse(out.slice(out.search(/^\[$/m)));
    files = packed[0].files;
    const tarball = path.join(tmp, packed[0].filename);
    app = path.join(tmp, 'app');
    run('mkdir', ['-p', app], tmp);
    writeFileSync(path.join(app, 'package.json'), JSON.stringify({ name: 'scratch-app', private: true, type: 'module' }));
    // From npm's cache when `npm ci` in web/ filled it; the registry otherwise.
    run('npm', ['install', '--prefer-offline', '--no-audit', '--no-fund', '--ignore-scripts', tarball, 'rxjs@^7.8.0', 'eventsource@^4.1.1'], app);
    server = await startServer(serverBinary());
  });

  after(async () => {
    await server?.stop();
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  test('ships only the library: built JS, declarations, README, package.json', () => {
    assert.deepEqual(files.map((f) => f.path).sort(), [
      'README.md',
      'lib/taskstream.cjs',
      'lib/taskstream.d.cts',
      'lib/taskstream.d.ts',
      'lib/taskstream.js',
      'package.json',
    ]);
  });

  test('rxjs is the app’s one copy (a peer dependency), not the package’s own', () => {
    assert.ok(existsSync(path.join(app, 'node_modules', 'rxjs')));
    assert.ok(!existsSync(path.join(app, 'node_modules', 'taskstream-client', 'node_modules')), 'the package brought its own node_modules');
  });

  test('Node ESM with the eventsource polyfill: a board and the raw stream see a published update', () => {
    writeFileSync(
      path.join(app, 'esm.mjs'),
      `
import { EventSource } from 'eventsource';
import { Observable, filter, firstValueFrom } from 'rxjs';
import { fromEventSource, taskBoard, updateTask } from 'taskstream-client';
const url = process.argv[2];
const board = taskBoard(url, { EventSource });
const shared = board instanceof Observable;
const first = firstValueFrom(board.pipe(filter((s) => s.tasks.get('pkg-esm')?.version === 1)));
const sub = board.subscribe();
await board.ready(10000);
const raw = firstValueFrom(fromEventSource(url + '/events', { EventSource }).pipe(filter((e) => e.type === 'task_updated')));
await updateTask(url, { task_id: 'pkg-esm', status: 'done' });
const state = await first;
const ev = await raw;
sub.unsubscribe();
console.log(JSON.stringify({ shared, status: state.tasks.get('pkg-esm').status, raw: ev.type === 'task_updated' ? ev.data.status : null }));
process.exit(0);
`,
    );
    const out = JSON.parse(run('node', ['esm.mjs', server.url], app));
    assert.deepEqual(out, { shared: true, status: 'done', raw: 'done' });
  });

  test('Node CommonJS: require() gets the CJS build', () => {
    writeFileSync(
      path.join(app, 'cjs.cjs'),
      `
const { EventSource } = require('eventsource');
const { firstValueFrom } = require('rxjs');
const ts = require('taskstream-client');
(async () => {
  const board = ts.taskBoard(process.argv[2], { EventSource });
  const sub = board.subscribe();
  await board.ready(10000);
  const { task } = await ts.updateTask(process.argv[2], { task_id: 'pkg-cjs', status: 'todo' });
  const state = await firstValueFrom(board);
  sub.unsubscribe();
  console.log(JSON.stringify({ kinds: [typeof ts.fromEventSource, typeof ts.fromWebSocket, typeof ts.TaskstreamError], version: task.version, size: state.tasks.size > 0 }));
  process.exit(0);
})();
`,
    );
    const out = JSON.parse(run('node', ['cjs.cjs', server.url], app));
    assert.deepEqual(out, { kinds: ['function', 'function', 'function'], version: 1, size: true });
  });

  test('a strict tsc over the app reads the shipped declarations, and type narrows data', () => {
    writeFileSync(
      path.join(app, 'app.ts'),
      `
import { EventSource } from 'eventsource';
import { fromEventSource, type ConnectionInfo, type TaskEvent, taskBoard, updateTask } from 'taskstream-client';
declare const process: { argv: string[]; exit(code: number): never };
export function describe(ev: TaskEvent): string {
  if (ev.type === 'task_updated') return ev.id + ' ' + (ev.data.status ?? '') + ' v' + ev.data.version;
  if (ev.type === 'task_deleted') {
    // @ts-expect-error a deletion has no status: narrowing works only if this is an error
    return ev.data.status;
  }
  return 'reset: ' + ev.data.reason;
}
export const label = (i: ConnectionInfo): string => (i.state === 'open' ? 'live' : i.state + ' ' + (i.reason ?? ''));
const url = process.argv[2] ?? '';
const board = taskBoard(url, { EventSource: EventSource as never, getToken: () => 'unused-without-auth' });
const seen: string[] = [];
const sub = fromEventSource(url + '/events', { EventSource: EventSource as never }).subscribe((ev) => seen.push(describe(ev)));
const b = board.subscribe();
await board.ready(10000);
await updateTask(url, { task_id: 'pkg-bundle', status: 'bundled' });
for (let i = 0; i < 100 && seen.length === 0; i++) await new Promise((r) => setTimeout(r, 50));
sub.unsubscribe();
b.unsubscribe();
console.log(JSON.stringify(seen));
process.exit(0);
`,
    );
    writeFileSync(
      path.join(app, 'tsconfig.json'),
      JSON.stringify({
        compilerOptions: {
          target: 'ES2022',
          module: 'NodeNext',
          moduleResolution: 'NodeNext',
          lib: ['ES2022', 'DOM'],
          types: [],
          strict: true,
          noEmit: true,
          skipLibCheck: false,
          noPropertyAccessFromIndexSignature: true,
          exactOptionalPropertyTypes: true,
          noUncheckedIndexedAccess: true,
          noImplicitOverride: true,
        },
        files: ['app.ts'],
      }),
    );
    // tsc from web/, run in the app: it resolves taskstream-client from the app's node_modules.
    const tsc = path.join(WEB_DIR, 'node_modules', 'typescript', 'bin', 'tsc');
    try {
      run('node', [tsc, '-p', 'tsconfig.json'], app);
    } catch (err) {
      assert.fail(`tsc failed:\n${/** @type {{ stdout?: string }} */ (err).stdout}`);
    }
  });

  test('esbuild bundles the app with one RxJS, and the bundle runs', async () => {
    const esbuild = await import('esbuild');
    const result = await esbuild.build({
      absWorkingDir: app,
      entryPoints: ['app.ts'],
      bundle: true,
      platform: 'node',
      format: 'esm',
      target: 'node18',
      outfile: 'bundle.mjs',
      metafile: true,
      logLevel: 'silent',
    });
    const inputs = Object.keys(result.metafile.inputs);
    assert.ok(inputs.some((p) => p.endsWith('node_modules/taskstream-client/lib/taskstream.js')), 'the ESM build was not used');
    const rxjsRoots = new Set(inputs.filter((p) => p.includes('node_modules/rxjs/')).map((p) => p.slice(0, p.indexOf('node_modules/rxjs/'))));
    assert.deepEqual([...rxjsRoots], [''], `RxJS copies: ${[...rxjsRoots].join(', ')}`);
    assert.ok(!inputs.some((p) => p.includes('/src/')), 'TypeScript sources of the package were bundled');
    const out = JSON.parse(run('node', ['bundle.mjs', server.url], app));
    assert.equal(out.length, 1);
    assert.match(out[0], /^\S+ bundled v1$/);
  });
});
