// @ts-check
/**
 * End-to-end: the board page, served by a real taskstream on a random port,
 * in Debian's Chromium driven by playwright-core. Run with `npm run e2e`.
 */
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test as nodeTest } from 'node:test';
import {
  REPO_DIR,
  WEB_DIR,
  boardRows,
  browserGate,
  launchChromium,
  openBoard,
  percentile,
  post,
  recorded,
  serverBinary,
  serverTasks,
  startServer,
  waitForBoard,
  waitForState,
} from './harness.mjs';

const gate = browserGate();
/** Updates timed by the latency test: fewer in CI, where the test is a check, not the figures of docs/web.md. */
const LATENCY_SAMPLES = process.env.CI === 'true' ? 40 : 100;

if (!gate.ok && gate.fatal) {
  nodeTest('Chromium is available for the browser tests', () => {
    assert.fail(gate.reason);
  });
} else {
  // Each test is marked skipped (not just the suite), so the summary counts them.
  const skip = gate.ok ? false : gate.reason;
  /** Every test's pages and servers go when it ends, so they don't load the next one. */
  /** @type {Array<() => Promise<unknown>>} */
  const cleanups = [];
  const test = (/** @type {string} */ name, /** @type {() => Promise<void>} */ fn) =>
    nodeTest(name, { skip, timeout: 60_000 }, async () => {
      try {
        await fn();
      } finally {
        for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
      }
    });

  /** The transports the board runs on; the scenarios below run on each. */
  const TRANSPORTS = /** @type {const} */ (['sse', 'websocket']);

  describe('taskstream board in Chromium', () => {
    /** @type {import('playwright-core').Browser} */
    let browser;
    /** @type {string} */
    let bin;

    before(async () => {
      if (skip) return;
      bin = serverBinary();
      browser = await launchChromium();
    });

    after(async () => {
      await browser?.close();
    });

    /** A fresh server for one test, stopped when the test ends. */
    async function server(/** @type {string[]} */ args = []) {
      const s = await startServer(bin, { args });
      cleanups.push(() => s.stop());
      return s;
    }

    async function board(
      /** @type {string} */ url,
      /** @type {import('playwright-core').BrowserContextOptions} */ contextOptions = {},
      state = 'open',
    ) {
      const b = await openBoard(browser, url, contextOptions, state);
      cleanups.push(() => b.context.close());
      return b;
    }

    for (const transport of TRANSPORTS) {
      describe(`on ${transport === 'sse' ? 'SSE' : 'WebSocket'}`, () => {
        /** The board's URL on this transport (SSE is the default: no parameter). */
        const boardUrl = (/** @type {string} */ base, /** @type {string} */ extra = '') => {
          const q = [transport === 'sse' ? '' : `transport=${transport}`, extra].filter(Boolean).join('&');
          return `${base}/${q ? `?${q}` : ''}`;
        };

        test('(1) an update POSTed over HTTP appears on the board within a second; ?token= reaches every request', async () => {
          const s = await server();
          const requests = /** @type {Array<{ url: string, auth: string | undefined }>} */ ([]);
          const { page, problems } = await board(boardUrl(s.url, 'token=e2e-token'));
          page.on('request', (r) => requests.push({ url: r.url(), auth: r.headers().authorization }));
          await waitForState(page, 'open', 10_000, transport);
          assert.ok(await page.locator('.log-empty').isVisible(), 'an empty log says why it is empty');
          const started = Date.now();
          await post(s.url, { task_id: 101, status: 'in_progress', assignee: 'ana', title: 'Ship it' });
          await page.waitForSelector('tr[data-task-id="101"][data-version="1"]', { timeout: 1000 });
          const elapsed = Date.now() - started;
          assert.ok(elapsed < 1000, `took ${elapsed} ms`);
          const row = await page.locator('tr[data-task-id="101"]').innerText();
          assert.match(row, /Ship it/);
          assert.match(row, /in_progress/);
          assert.match(row, /ana/);
          // the log pane shows the raw event
          await page.waitForSelector('#log li[data-type="task_updated"]');
          assert.equal(await page.locator('.log-empty').isVisible(), false, 'the empty-log note goes with the first line');
          assert.match(await page.locator('#conn-badge').innerText(), transport === 'sse' ? /live\s*SSE/ : /live\s*WebSocket/);
          // The token: access_token on the stream, Bearer on fetch (a server without auth ignores both).
          const rec = await recorded(page);
          assert.equal(rec.urls.length, 1);
          const streamUrl = new URL(rec.urls[0], s.url);
          assert.equal(streamUrl.pathname, transport === 'sse' ? '/events' : '/ws');
          assert.equal(streamUrl.searchParams.get('access_token'), 'e2e-token');
          await page.reload();
          await waitForState(page, 'open', 10_000, transport);
          const snapshot = requests.find((r) => new URL(r.url).pathname === '/tasks');
          assert.equal(snapshot?.auth, 'Bearer e2e-token');
          assert.deepEqual(problems, []);
        });

        test('(2) after a server restart on the same port the page reconnects and shows every later change, once', async () => {
          const first = await startServer(bin);
          cleanups.push(() => first.stop());
          const { page, problems } = await board(boardUrl(first.url));
          await post(first.url, { task_id: 1, status: 'todo', title: 'before the restart' });
          await post(first.url, { task_id: 2, status: 'todo' });
          await post(first.url, { task_id: 2, status: 'in_progress' });
          await waitForBoard(page, await serverTasks(first.url));

          const code = await first.stop();
          assert.equal(code, 0, `taskstream exited with ${code} on SIGTERM\n${first.logs()}`);
          await waitForState(page, 'reconnecting');

          const second = await startServer(bin, { port: first.port });
          cleanups.push(() => second.stop());
          assert.equal(second.url, first.url);
          // Updates right away, racing the page's reconnect: it must get them by
          // replay or by reset-and-reload, either way exactly once.
          for (let i = 0; i < 5; i++) await post(second.url, { task_id: 2, status: `after-${i}` });
          await post(second.url, { task_id: 'r1', status: 'review', assignee: 'bo' });
          await waitForState(page, 'open', 10_000, transport);
          for (let i = 0; i < 5; i++) await post(second.url, { task_id: 3, status: `live-${i}` });

          const expected = await serverTasks(second.url);
          await waitForBoard(page, expected);
          const shown = await boardRows(page);
          assert.equal(shown.count, Object.keys(expected).length, 'a duplicate row');
          assert.deepEqual(shown.tasks, expected);
          const rec = await recorded(page);
          assert.ok(rec.events.some(([, type]) => type === 'reset'), 'the restarted server did not send reset');
          // The browser logs each refused reconnect while the server is down.
          assert.deepEqual(problems.filter((p) => !/ERR_CONNECTION_REFUSED/.test(p)), []);
        });

        test('(3) two pages stay identical through a burst of 500 updates', async () => {
          const s = await server();
          const a = await board(boardUrl(s.url));
          const b = await board(boardUrl(s.url));
          /** @type {string[]} */
          const ids = [];
          const tasks = 10;
          let next = 0;
          // 500 updates, 16 in flight at a time, spread over 10 tasks.
          const worker = async () => {
            while (next < 500) {
              const i = next++;
              const res = await post(s.url, { task_id: 200 + (i % tasks), status: i % 3 ? 'in_progress' : 'review', data: { i } });
              ids.push(res.event_id);
            }
          };
          await Promise.all(Array.from({ length: 16 }, worker));
          const expected = await serverTasks(s.url);
          assert.equal(Object.keys(expected).length, tasks);
          assert.equal(Object.values(expected).reduce((n, t) => n + Number(t.version), 0), 500);

          await Promise.all([waitForBoard(a.page, expected), waitForBoard(b.page, expected)]);
          const [rowsA, rowsB] = await Promise.all([boardRows(a.page), boardRows(b.page)]);
          assert.deepEqual(rowsA, rowsB);
          assert.deepEqual(rowsA.tasks, expected);

          const [recA, recB] = await Promise.all([recorded(a.page), recorded(b.page)]);
          assert.equal(recA.urls.length, 1, `page A opened ${recA.urls.length} connections`);
          assert.equal(recB.urls.length, 1, `page B opened ${recB.urls.length} connections`);
          assert.match(recA.urls[0], transport === 'sse' ? /\/events\?/ : /^ws:\/\/.*\/ws\?heartbeat=1$/);
          const seenA = recA.events.map(([id]) => id);
          const seenB = recB.events.map(([id]) => id);
          assert.deepEqual(seenA, seenB, 'the pages saw different event sequences');
          assert.equal(new Set(seenA).size, seenA.length, 'an event delivered twice');
          assert.deepEqual([...seenA].sort(), [...ids].sort(), 'the pages did not see exactly the 500 published events');
          assert.deepEqual(a.problems, []);
          assert.deepEqual(b.problems, []);
        });

        test('(4) the form updates a task and both pages show it', async () => {
          const s = await server();
          const a = await board(boardUrl(s.url));
          const b = await board(boardUrl(s.url));
          await a.page.fill('input[name="task_id"]', '777');
          await a.page.fill('input[name="status"]', 'review');
          await a.page.fill('input[name="assignee"]', 'chen');
          await a.page.fill('input[name="title"]', 'Made with the form');
          await a.page.click('#update-form button[type="submit"]');
          // On WebSocket the form publishes on the board's socket, on SSE by POST.
          await a.page.waitForSelector(`#form-result.ok[data-via="${transport === 'sse' ? 'http' : 'websocket'}"]`);
          for (const { page } of [a, b]) {
            await page.waitForSelector('tr[data-task-id="777"][data-version="1"][data-status="review"][data-assignee="chen"]', { timeout: 2000 });
          }
          const res = await fetch(`${s.url}/tasks/777`);
          const task = await res.json();
          assert.equal(res.status, 200);
          assert.equal(task.task_id, 777);
          assert.equal(task.title, 'Made with the form');
          const sent = (await recorded(a.page)).sent.map((m) => JSON.parse(m));
          const updates = sent.filter((m) => m.type === 'update_task');
          if (transport === 'websocket') {
            assert.equal(updates.length, 1);
            assert.deepEqual({ ...updates[0], request_id: 0 }, { type: 'update_task', request_id: 0, task_id: 777, status: 'review', assignee: 'chen', title: 'Made with the form' });
          } else {
            assert.equal(updates.length, 0);
          }
          assert.deepEqual(a.problems, []);
          assert.deepEqual(b.problems, []);
        });

        test(`(5) a page refused (--max-subscribers: ${transport === 'sse' ? '503' : 'close 1013'}) keeps retrying and opens once a slot is free`, async () => {
          const s = await server(['--max-subscribers', '1']);
          await post(s.url, { task_id: 1, status: 'todo' });
          const a = await board(boardUrl(s.url));
          const b = await board(boardUrl(s.url), {}, 'reconnecting');
          await waitForBoard(b.page, await serverTasks(s.url)); // the snapshot loads all the same
          await a.context.close();
          await post(s.url, { task_id: 1, status: 'done' });
          // A refused WebSocket opens before its 1013: wait for the event, not the badge.
          await b.page.waitForSelector('tr[data-task-id="1"][data-version="2"]', { timeout: 20_000 });
          await waitForState(b.page, 'open');
          const rec = await recorded(b.page);
          assert.ok(rec.urls.length >= 2, 'the client did not reconnect by itself');
          if (transport === 'sse') {
            assert.match(rec.urls.at(-1) ?? '', /last_event_id=/);
          } else {
            const subscribes = rec.sent.map((m) => JSON.parse(m)).filter((m) => m.type === 'subscribe');
            assert.ok(subscribes.length >= 2, `${subscribes.length} subscribe messages`);
            assert.ok(subscribes.every((m) => typeof m.last_event_id === 'string'), JSON.stringify(subscribes));
          }
          // The browser logs each refused connection; nothing else may go wrong.
          assert.deepEqual(b.problems.filter((p) => !/status of 503/.test(p)), []);
        });

        test(`latency: POST to visible in the page, p50 and p99 over ${LATENCY_SAMPLES} updates after a pause${transport === 'websocket' ? ', and update_task on a socket to visible' : ''}`, async () => {
          const s = await server();
          const { page, problems } = await board(boardUrl(s.url));
          await post(s.url, { task_id: 'latency', status: 'todo' });
          await page.waitForSelector('tr[data-task-id="latency"][data-version="1"]');
          /**
           * Publishes `samples` updates one at a time from the page (after
           * `warmup`), by fetch('POST /update_task') or as update_task on a
           * WebSocket of the page's own, and times each until the row shows it.
           * Each comes `pauseMs` after the last was shown: a change after a quiet
           * moment, which the board draws at the next frame (a stream of changes
           * is drawn every 100 ms, docs/web.md).
           * @param {'post' | 'socket'} via
           */
          const measure = (via) =>
            page.evaluate(async ({ warmup, samples, via, pauseMs }) => {
              const body = /** @type {HTMLElement} */ (document.getElementById('task-rows'));
              const row = () => /** @type {HTMLElement | null} */ (document.querySelector('tr[data-task-id="latency"]'));
              /** @type {WebSocket | undefined} */
              let ws;
              /** @type {Map<number, (m: any) => void>} */
              const answers = new Map();
              if (via === 'socket') {
                const socket = new WebSocket(`${location.origin.replace(/^http/, 'ws')}/ws`);
                ws = socket;
                socket.onmessage = (e) => {
                  const m = JSON.parse(e.data);
                  answers.get(m.request_id)?.(m);
                };
                await new Promise((resolve, reject) => {
                  socket.onopen = resolve;
                  socket.onerror = reject;
                });
              }
              const dom = [];
              const frame = [];
              let version = Number(row()?.dataset.version);
              for (let i = 0; i < warmup + samples; i++) {
                // Pacing the publisher (what is measured is the time after it), not waiting for an event.
                await new Promise((r) => setTimeout(r, pauseMs));
                const want = String(++version);
                /** @type {Promise<number>} */
                const visible = new Promise((resolve) => {
                  const mo = new MutationObserver(() => {
                    if (row()?.dataset.version === want) {
                      mo.disconnect();
                      resolve(performance.now());
                    }
                  });
                  mo.observe(body, { subtree: true, childList: true, attributes: true, attributeFilter: ['data-version'] });
                });
                const patch = { task_id: 'latency', status: i % 2 ? 'in_progress' : 'review', data: { i } };
                const t0 = performance.now();
                /** @type {Promise<string>} */
                let answer;
                if (ws) {
                  answer = new Promise((resolve) => answers.set(i, (m) => resolve(m.type)));
                  ws.send(JSON.stringify({ type: 'update_task', request_id: i, ...patch }));
                } else {
                  answer = fetch('/update_task', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(patch) }).then(
                    (res) => String(res.status),
                  );
                }
                const t1 = await visible;
                // The next animation frame after the change: when it can be painted.
                // (performance.now() in the callback, not its argument: that is the frame's start.)
                /** @type {number} */
                const t2 = await new Promise((r) => requestAnimationFrame(() => r(performance.now())));
                const answered = await answer;
                if (answered !== (ws ? 'ack' : '202')) throw new Error(`update ${i} answered ${answered}`);
                if (i >= warmup) {
                  dom.push(t1 - t0);
                  frame.push(t2 - t0);
                }
              }
              ws?.close();
              return { dom, frame };
            }, { warmup: 5, samples: LATENCY_SAMPLES, via, pauseMs: 120 });

          const round = (/** @type {number} */ x) => Math.round(x * 100) / 100;
          const summary = (/** @type {{ dom: number[], frame: number[] }} */ result) => {
            const dom = [...result.dom].sort((x, y) => x - y);
            const frame = [...result.frame].sort((x, y) => x - y);
            return {
              samples: dom.length,
              p50_ms: round(percentile(dom, 50)),
              p99_ms: round(percentile(dom, 99)),
              max_ms: round(dom[dom.length - 1]),
              next_frame_p50_ms: round(percentile(frame, 50)),
              next_frame_p99_ms: round(percentile(frame, 99)),
            };
          };
          const posted = summary(await measure('post'));
          const report = {
            transport,
            what: `POST /update_task issued by fetch() in the page -> the task row's data-version changed (MutationObserver), performance.now(); the board on ${transport}`,
            ...posted,
            ...(transport === 'websocket'
              ? { update_task_on_a_socket: { what: 'update_task sent on a second WebSocket of the page -> the row changed', ...summary(await measure('socket')) } }
              : {}),
            browser: `Chromium ${browser.version()} (headless)`,
            server: `${path.relative(REPO_DIR, bin)}, 127.0.0.1, --retry 200`,
            // The numbers move with whatever else the machine is doing: say what that was.
            machine: `${os.cpus().length} CPUs, load average ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`,
            measured_at: new Date().toISOString(),
          };
          const line = (/** @type {string} */ what, /** @type {ReturnType<typeof summary>} */ r) =>
            `[${transport}] ${what} over ${r.samples} updates: p50 ${r.p50_ms} ms, p99 ${r.p99_ms} ms ` +
            `(max ${r.max_ms} ms; next frame p50 ${r.next_frame_p50_ms} ms, p99 ${r.next_frame_p99_ms} ms; ${report.machine})`;
          console.log(line('POST -> visible', posted));
          if (report.update_task_on_a_socket) console.log(line('update_task on a socket -> visible', report.update_task_on_a_socket));
          const dir = path.join(WEB_DIR, 'test-results');
          mkdirSync(dir, { recursive: true });
          writeFileSync(path.join(dir, `latency-${transport}.json`), JSON.stringify(report, null, 2) + '\n');
          assert.equal(report.samples, LATENCY_SAMPLES);
          assert.ok(report.p99_ms < 1000, `p99 ${report.p99_ms} ms`);
          // A change after a quiet moment is drawn at the next frame, not held for the 100 ms a
          // stream of changes waits (docs/web.md): 8 to 13 ms at p50 measured, quiet or in CI.
          assert.ok(report.p50_ms < 60, `p50 ${report.p50_ms} ms: a lone change waited for the data frame`);
          if (report.update_task_on_a_socket) assert.ok(report.update_task_on_a_socket.p99_ms < 1000);
          assert.deepEqual(problems, []);
        });
      });
    }

    test('switching the transport on the page keeps the board consistent, and the URL remembers it', async () => {
      const s = await server();
      for (let i = 1; i <= 5; i++) await post(s.url, { task_id: i, status: 'todo' });
      const { page, problems } = await board(`${s.url}/`);
      await waitForState(page, 'open', 10_000, 'sse');
      assert.ok(await page.isChecked('#transport-switch input[value="sse"]'));
      // Updates keep flowing while the page switches back and forth, paced
      // (about 40 a second) so that the page, not the poster, is under test.
      let posting = true;
      let posted = 0;
      const poster = (async () => {
        while (posting) {
          await post(s.url, { task_id: 1 + (posted % 5), status: `s-${posted}` });
          posted++;
          await new Promise((r) => setTimeout(r, 25));
        }
      })();
      try {
        for (const transport of ['websocket', 'sse', 'websocket']) {
          await page.locator('#transport-switch label', { hasText: transport === 'sse' ? 'SSE' : 'WebSocket' }).click();
          await waitForState(page, 'open', 10_000, transport);
          assert.equal(new URL(page.url()).searchParams.get('transport'), transport);
          // Events flow on the new transport: an update made now reaches the page.
          const { task } = await post(s.url, { task_id: 'mark', status: transport });
          await page.waitForSelector(`tr[data-task-id="mark"][data-version="${task.version}"]`, { timeout: 5000 });
        }
      } finally {
        posting = false;
        await poster;
      }
      const expected = await serverTasks(s.url);
      await waitForBoard(page, expected);
      const shown = await boardRows(page);
      assert.equal(shown.count, 6, 'a duplicate or missing row');
      assert.deepEqual(shown.tasks, expected);
      const rec = await recorded(page);
      assert.deepEqual(
        rec.urls.map((u) => new URL(u, s.url).pathname),
        ['/events', '/ws', '/events', '/ws'],
        'one connection per switch, each closed before the next',
      );
      assert.equal(await page.locator('#log .log-note').count(), 3);
      // A reload comes back on the transport in the URL.
      await page.reload();
      await waitForState(page, 'open', 10_000, 'websocket');
      assert.ok(await page.isChecked('#transport-switch input[value="websocket"]'));
      await waitForBoard(page, expected);
      assert.deepEqual(problems, []);
      const metrics = await (await fetch(`${s.url}/metrics`)).text();
      assert.match(metrics, /^taskstream_subscribers 0$/m, 'an SSE stream left open');
      assert.match(metrics, /^taskstream_ws_clients 1$/m, 'not exactly one WebSocket open');
    });
  });
}
