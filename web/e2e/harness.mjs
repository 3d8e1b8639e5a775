// @ts-check
/**
 * Test harness for the browser tests: finds Chromium and the taskstream
 * binary, starts servers on random (or given) ports, opens board pages that
 * record every event their EventSource or WebSocket receives.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const WEB_DIR = path.resolve(here, '..');
export const REPO_DIR = path.resolve(WEB_DIR, '..');

export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/**
 * Whether the browser tests can run. Where Chromium is missing they say so
 * loudly; under CI=true that is a failure, elsewhere a skip.
 * @returns {{ ok: true } | { ok: false, reason: string, fatal: boolean }}
 */
export function browserGate() {
  if (existsSync(CHROMIUM)) return { ok: true };
  const reason = `Chromium not found at ${CHROMIUM}: install it with \`apt-get install -y chromium\` (or set CHROMIUM_PATH)`;
  const fatal = process.env.CI === 'true';
  const bar = '!'.repeat(78);
  console.error(
    [
      '',
      bar,
      `!!  BROWSER TESTS ${fatal ? 'FAILED' : 'SKIPPED'}: ${reason}`,
      fatal ? '!!  CI=true: a missing browser is a failure.' : '!!  Nothing was tested in a browser.',
      bar,
      '',
    ].join('\n'),
  );
  return { ok: false, reason, fatal };
}

/** Launches Debian's Chromium (never a downloaded one), with a fresh temp profile. */
export async function launchChromium() {
  const { chromium } = await import('playwright-core');
  // launch() gives every browser a fresh temporary user-data-dir and removes it on close.
  return chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
}

/**
 * The taskstream binary: TASKSTREAM_BIN, else target/debug/taskstream after a
 * `cargo build` (which also embeds the freshly built web/dist).
 * @returns {string}
 */
export function serverBinary() {
  if (process.env.TASKSTREAM_BIN) {
    const bin = path.resolve(WEB_DIR, process.env.TASKSTREAM_BIN);
    if (!existsSync(bin)) {
      throw new Error(`TASKSTREAM_BIN=${process.env.TASKSTREAM_BIN} does not exist: run \`cargo build\` in ${REPO_DIR} and point it at target/debug/taskstream, or unset it`);
    }
    return bin;
  }
  const bin = path.join(REPO_DIR, 'target', 'debug', 'taskstream');
  const built = spawnSync('cargo', ['build', '--quiet', '--bin', 'taskstream'], { cwd: REPO_DIR, stdio: ['ignore', 'inherit', 'inherit'] });
  if (built.error && 'code' in built.error && built.error.code === 'ENOENT' && existsSync(bin)) {
    console.error(`!! cargo is not on PATH: testing the existing ${bin}, which may embed an older web/dist`);
    return bin;
  }
  if (built.error || built.status !== 0 || !existsSync(bin)) {
    const why = built.error ? built.error.message : `cargo build exited with ${built.status}`;
    throw new Error(
      `The taskstream binary is missing or could not be built (${why}).\n` +
        `Run \`cargo build\` in ${REPO_DIR} first (or set TASKSTREAM_BIN to a built binary).`,
    );
  }
  return bin;
}

/**
 * @typedef {object} Server
 * @property {string} url      e.g. http://127.0.0.1:41234
 * @property {number} port
 * @property {() => Promise<number | null>} stop  SIGTERM, then the exit code
 * @property {() => string} logs  what it wrote to stderr
 * @property {(signal: NodeJS.Signals) => void} signal  e.g. SIGSTOP / SIGCONT, to freeze it
 */

/**
 * Starts `taskstream --bind 127.0.0.1:PORT` (0 = any port) and waits for its
 * `taskstream listening on URL` line.
 * @param {string} bin
 * @param {{ port?: number, args?: string[], tries?: number }} [opts]
 * @returns {Promise<Server>}
 */
export async function startServer(bin, opts = {}) {
  const port = opts.port ?? 0;
  const tries = opts.tries ?? (port ? 20 : 1);
  let lastError;
  for (let i = 0; i < tries; i++) {
    try {
      return await startOnce(bin, port, opts.args ?? []);
    } catch (err) {
      // A port just freed can still be held for a moment; try again shortly.
      lastError = err;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  throw lastError;
}

/**
 * @param {string} bin
 * @param {number} port
 * @param {string[]} args
 * @returns {Promise<Server>}
 */
function startOnce(bin, port, args) {
  // --keep-alive may be given once only: a test's own value replaces the default 2.
  const keepAlive = args.includes('--keep-alive') ? [] : ['--keep-alive', '2'];
  const child = spawn(bin, ['--bind', `127.0.0.1:${port}`, '--retry', '200', ...keepAlive, ...args], {
    cwd: REPO_DIR,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn' },
  });
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (d) => {
    stderr = (stderr + d).slice(-20_000);
  });
  /** @type {Promise<number | null>} */
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve(signal ? null : code)));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => fail(new Error('taskstream did not print its listening line within 10 s')), 10_000);
    /** @param {Error} err */
    const fail = (err) => {
      clearTimeout(timer);
      child.kill('SIGKILL');
      reject(new Error(`${err.message}\n--- taskstream stderr ---\n${stderr}`));
    };
    child.once('error', fail);
    void exited.then((code) => fail(new Error(`taskstream exited with ${code} before listening`)));
    const lines = createInterface({ input: child.stdout });
    lines.on('line', (line) => {
      const m = /^taskstream listening on (http:\/\/[^\s]+)$/.exec(line.trim());
      if (!m) return;
      clearTimeout(timer);
      child.removeAllListeners('error');
      const url = m[1].replace(/\/$/, '');
      resolve({
        url,
        port: Number(new URL(url).port),
        logs: () => stderr,
        signal: (sig) => {
          child.kill(sig);
        },
        stop: async () => {
          // A frozen server cannot exit on SIGTERM.
          if (child.exitCode === null && child.signalCode === null) child.kill('SIGCONT');
          if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
          child.kill('SIGTERM');
          const timeout = new Promise((r) => setTimeout(() => r('timeout'), 8_000));
          const code = await Promise.race([exited, timeout]);
          if (code === 'timeout') {
            child.kill('SIGKILL');
            throw new Error('taskstream did not exit within 8 s of SIGTERM');
          }
          return /** @type {number | null} */ (code);
        },
      });
    });
  });
}

/**
 * POST /update_task from Node.
 * @param {string} base
 * @param {Record<string, unknown>} patch
 * @returns {Promise<{ event_id: string, task: any }>}
 */
export async function post(base, patch) {
  const res = await fetch(`${base}/update_task`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(patch),
  });
  const body = await res.json();
  if (res.status !== 202) throw new Error(`POST /update_task ${JSON.stringify(patch)} answered ${res.status}: ${JSON.stringify(body)}`);
  return body;
}

/**
 * GET /tasks, as {key: {version, status, assignee}}.
 * @param {string} base
 */
export async function serverTasks(base) {
  const res = await fetch(`${base}/tasks`);
  if (!res.ok) throw new Error(`GET /tasks answered ${res.status}`);
  const body = await res.json();
  /** @type {Record<string, { version: string, status: string, assignee: string }>} */
  const out = {};
  for (const t of body.tasks) {
    out[String(t.task_id)] = { version: String(t.version), status: t.status ?? '', assignee: t.assignee ?? '' };
  }
  return out;
}

/**
 * Records, before any page script runs, every EventSource and WebSocket the
 * page opens, every event they receive and every message a WebSocket sends,
 * in window.__ts.
 */
function recordConnections() {
  /** @type {{ urls: string[], events: Array<[string, string]>, sent: string[], errors: string[] }} */
  const rec = { urls: [], events: [], sent: [], errors: [] };
  // @ts-ignore: test-only global
  window.__ts = rec;
  const OrigES = window.EventSource;
  class RecordingEventSource extends OrigES {
    /** @param {string | URL} url @param {EventSourceInit} [init] */
    constructor(url, init) {
      super(url, init);
      rec.urls.push(String(url));
      for (const type of ['task_updated', 'task_deleted', 'reset']) {
        super.addEventListener(type, (e) => rec.events.push([/** @type {MessageEvent} */ (e).lastEventId, type]));
      }
    }
  }
  window.EventSource = RecordingEventSource;
  const OrigWS = window.WebSocket;
  class RecordingWebSocket extends OrigWS {
    /** @param {string | URL} url @param {string | string[]} [protocols] */
    constructor(url, protocols) {
      super(url, protocols);
      rec.urls.push(String(url));
      super.addEventListener('message', (e) => {
        try {
          const m = JSON.parse(/** @type {MessageEvent} */ (e).data);
          if (m.type === 'event' || m.type === 'reset') rec.events.push([m.id, m.type === 'reset' ? 'reset' : m.event]);
        } catch {
          rec.errors.push(`not JSON: ${String(/** @type {MessageEvent} */ (e).data).slice(0, 100)}`);
        }
      });
    }
    /** @override @param {string | ArrayBufferLike | Blob | ArrayBufferView} data */
    send(data) {
      rec.sent.push(String(data));
      super.send(data);
    }
  }
  window.WebSocket = RecordingWebSocket;
  window.addEventListener('error', (e) => rec.errors.push(String(e.message)));
}

/**
 * Opens the board in a new context and waits until its badge says open
 * (or the given state).
 * @param {import('playwright-core').Browser} browser
 * @param {string} url
 * @param {import('playwright-core').BrowserContextOptions} [contextOptions]
 * @param {string} [state] the badge state to wait for
 */
export async function openBoard(browser, url, contextOptions = {}, state = 'open') {
  const context = await browser.newContext({ viewport: { width: 1280, height: 760 }, ...contextOptions });
  const page = await context.newPage();
  /** @type {string[]} */
  const problems = [];
  page.on('pageerror', (err) => problems.push(`pageerror: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error') problems.push(`console.error: ${msg.text()}`);
  });
  await page.addInitScript(recordConnections);
  await page.goto(url);
  await waitForState(page, state);
  return { page, context, problems };
}

/**
 * Waits until the badge shows this state (and, if given, this transport).
 * @param {import('playwright-core').Page} page
 * @param {string} state
 * @param {number} [timeout]
 * @param {string} [transport] `sse` or `websocket`
 */
export async function waitForState(page, state, timeout = 10_000, transport) {
  const via = transport ? `[data-transport="${transport}"]` : '';
  await page.waitForSelector(`#conn-badge[data-state="${state}"]${via}`, { timeout });
}

/**
 * The board's rows as {key: {version, status, assignee}}, and the row count.
 * The table is windowed (only rows in view are in the DOM), so this reads the
 * rows the last frame drew (`window.taskstreamBoard.rows()`), and checks that
 * every row in the DOM shows exactly that.
 * @param {import('playwright-core').Page} page
 */
export function boardRows(page) {
  return page.evaluate(() => {
    // @ts-ignore: the board's own test hook
    const drawn = /** @type {Array<{ key: string, version: string, status: string, assignee: string }>} */ (window.taskstreamBoard.rows());
    /** @type {Record<string, { version: string, status: string, assignee: string }>} */
    const tasks = {};
    for (const r of drawn) tasks[r.key] = { version: r.version, status: r.status, assignee: r.assignee };
    const dom = /** @type {HTMLTableRowElement[]} */ ([...document.querySelectorAll('#task-rows tr[data-task-id]')]);
    for (const r of dom) {
      const t = tasks[r.dataset.taskId ?? ''];
      if (!t || t.version !== r.dataset.version || t.status !== r.dataset.status || t.assignee !== r.dataset.assignee) {
        throw new Error(`row ${r.dataset.taskId} in the DOM (v${r.dataset.version}) differs from the drawn model (${JSON.stringify(t)})`);
      }
    }
    return { tasks, count: drawn.length, inDom: dom.length };
  });
}

/**
 * Waits until the page shows exactly these tasks at these versions.
 * @param {import('playwright-core').Page} page
 * @param {Record<string, { version: string }>} expected
 * @param {number} [timeout]
 */
export async function waitForBoard(page, expected, timeout = 10_000) {
  const want = Object.fromEntries(Object.entries(expected).map(([k, v]) => [k, v.version]));
  await page.waitForFunction(
    (want) => {
      // @ts-ignore: the board's own test hook
      const rows = /** @type {Array<{ key: string, version: string }>} */ (window.taskstreamBoard.rows());
      if (rows.length !== Object.keys(want).length) return false;
      return rows.every((r) => want[r.key] === r.version);
    },
    want,
    { timeout, polling: 'raf' },
  );
}

/**
 * What the page's EventSources and WebSockets recorded: the URLs they opened,
 * the [id, type] of every event, and what the WebSockets sent.
 * @param {import('playwright-core').Page} page
 * @returns {Promise<{ urls: string[], events: Array<[string, string]>, sent: string[], errors: string[] }>}
 */
export function recorded(page) {
  // @ts-ignore: test-only global
  return page.evaluate(() => window.__ts);
}

/** Nearest-rank percentile of sorted numbers. @param {number[]} sorted @param {number} p */
export function percentile(sorted, p) {
  const i = Math.max(0, Math.ceil((p / 100) * sorted.length) - 1);
  return sorted[Math.min(i, sorted.length - 1)];
}
