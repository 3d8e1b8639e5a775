// @ts-check
/**
 * The board as people meet it, in Debian's Chromium against a real
 * taskstream: accessibility (axe-core, injected from npm: 0 violations at
 * 1280x800 and 390x844, light and dark), reflow at 320 px, screenshots for
 * docs/, liveness (the server frozen with SIGSTOP: the board leaves `live`
 * within 2.5 x keep-alive and then shows every update made meanwhile), and
 * the frame-rate and main-thread figures written to test-results/perf.json.
 */
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test as nodeTest } from 'node:test';
import { REPO_DIR, WEB_DIR, boardRows, browserGate, launchChromium, openBoard, post, serverBinary, serverTasks, startServer, waitForBoard, waitForState } from './harness.mjs';

const require = createRequire(import.meta.url);
const AXE = require.resolve('axe-core/axe.min.js');
const gate = browserGate();
/** Seconds of steady load per figure: shorter in CI, where only the invariants and targets matter. */
const STEADY_S = process.env.CI === 'true' ? 2 : 4;

const SEED = [
  { task_id: 101, title: 'Ship the release notes for 0.2 with the migration table and the known issues', status: 'completed', assignee: 'ana' },
  { task_id: 102, title: 'Write the migration guide', status: 'review', assignee: 'chen' },
  { task_id: 103, title: 'Fix flaky reconnect test', status: 'in_progress', assignee: 'bo' },
  { task_id: 104, title: 'Rotate the JWT signing key', status: 'blocked', assignee: 'dana' },
  { task_id: 'ops:backup', title: 'Nightly backup check', status: 'todo', assignee: null },
  { task_id: 'web-42', title: 'Dark mode for the board', status: 'in_progress', assignee: 'eli' },
  { task_id: 'web-43', title: 'Keyboard shortcuts for the form', status: 'todo', assignee: 'eli' },
  { task_id: 'proj-7:api', title: 'Document Last-Event-ID resume', status: 'completed', assignee: 'ana-maria-longname' },
];

/**
 * Publishes `n` updates with at most `inFlight` at a time.
 * @param {string} base @param {number} n @param {(i: number) => Record<string, unknown>} patch @param {number} [inFlight]
 */
async function publishMany(base, n, patch, inFlight = 16) {
  let next = 0;
  const worker = async () => {
    while (next < n) {
      const body = patch(next++);
      // A kept-alive connection the server closed just as it was reused: send again.
      await post(base, body).catch(() => post(base, body));
    }
  };
  await Promise.all(Array.from({ length: inFlight }, worker));
}

/**
 * Publishes `rate` updates a second for `seconds`, on a schedule (not one
 * after the other), so the page, not the poster, sets the pace.
 * @param {string} base @param {number} rate @param {number} seconds @param {(i: number) => Record<string, unknown>} patch
 */
async function publishAtRate(base, rate, seconds, patch) {
  const total = rate * seconds;
  const start = performance.now();
  /** @type {Promise<unknown>[]} */
  const pending = [];
  for (let i = 0; i < total; i++) {
    const due = start + (i * 1000) / rate;
    const wait = due - performance.now();
    // Pacing a load generator is the one place a timer is the point.
    if (wait > 1) await new Promise((r) => setTimeout(r, wait));
    pending.push(post(base, patch(i)));
  }
  await Promise.all(pending);
}

/**
 * Frame rates mean something only on a machine that is not busy with other
 * work: the targets (issue 17) are asserted when the load average per CPU was
 * below 1 at the start, and otherwise reported loudly, with the load, in
 * test-results/perf.json. TASKSTREAM_PERF_STRICT=1 asserts them regardless.
 * @param {{ load_average_at_start: number }} figures
 */
function figuresAsserted(figures) {
  const perCpu = figures.load_average_at_start / os.cpus().length;
  if (process.env.TASKSTREAM_PERF_STRICT === '1' || perCpu < 1) return true;
  console.error(`!! frame-rate targets NOT asserted: load average ${figures.load_average_at_start} on ${os.cpus().length} CPUs (other work on the machine); figures recorded as measured`);
  return false;
}

if (!gate.ok && gate.fatal) {
  nodeTest('Chromium is available for the board quality tests', () => assert.fail(gate.reason));
} else {
  const skip = gate.ok ? false : gate.reason;
  /** @type {Array<() => Promise<unknown>>} */
  const cleanups = [];
  const test = (/** @type {string} */ name, /** @type {() => Promise<void>} */ fn, /** @type {string | false} */ extraSkip = false) =>
    nodeTest(name, { skip: skip || extraSkip, timeout: 120_000 }, async () => {
      try {
        await fn();
      } finally {
        for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
      }
    });

  describe('board quality in Chromium', () => {
    /** @type {import('playwright-core').Browser} */
    let browser;
    /** @type {string} */
    let bin;
    /** @type {Record<string, unknown>} */
    const perf = {};

    before(async () => {
      if (skip) return;
      bin = serverBinary();
      browser = await launchChromium();
    });

    after(async () => {
      await browser?.close();
      if (Object.keys(perf).length > 0) {
        const dir = path.join(WEB_DIR, 'test-results');
        mkdirSync(dir, { recursive: true });
        const report = {
          ...perf,
          browser: `Chromium ${browser?.version()} (headless, --disable-gpu)`,
          server: `${path.relative(REPO_DIR, bin)}, 127.0.0.1`,
          machine: `${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}), ${Math.round(os.totalmem() / 2 ** 30)} GiB, load average ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`,
          measured_at: new Date().toISOString(),
        };
        writeFileSync(path.join(dir, 'perf.json'), JSON.stringify(report, null, 2) + '\n');
      }
    });

    async function server(/** @type {string[]} */ args = []) {
      const s = await startServer(bin, { args });
      cleanups.push(() => s.stop());
      return s;
    }

    async function board(/** @type {string} */ url, /** @type {import('playwright-core').BrowserContextOptions} */ contextOptions = {}, state = 'open') {
      const b = await openBoard(browser, url, contextOptions, state);
      cleanups.push(() => b.context.close());
      return b;
    }

    async function seeded() {
      const s = await server();
      for (const t of SEED) await post(s.url, t);
      return s;
    }

    // axe-core is injected as an inline script, which the board's Content-Security-Policy
    // (default-src 'self') rightly refuses: the contexts that run it bypass the CSP. The board's
    // own scripts run under the CSP in every other test (its `problems` list catches a violation).
    const AXE_CONTEXT = { bypassCSP: true };

    /** Runs axe-core over the page; returns its violations as short strings. @param {import('playwright-core').Page} page */
    async function axe(page) {
      await page.addScriptTag({ path: AXE });
      // @ts-ignore: axe is the injected global
      const result = await page.evaluate(() => window.axe.run(document, { resultTypes: ['violations'] }));
      return /** @type {Array<{ id: string, impact: string, nodes: Array<{ target: string[], failureSummary: string }> }>} */ (result.violations).map(
        (v) => `${v.id} (${v.impact}): ${v.nodes.map((n) => `${n.target.join(' ')}: ${n.failureSummary}`).join(' | ')}`,
      );
    }

    for (const colorScheme of /** @type {const} */ (['light', 'dark'])) {
      for (const viewport of [{ width: 1280, height: 800 }, { width: 390, height: 844 }]) {
        test(`axe-core: 0 violations at ${viewport.width}x${viewport.height}, ${colorScheme}`, async () => {
          const s = await seeded();
          const { page, problems } = await board(`${s.url}/`, { viewport, colorScheme, ...AXE_CONTEXT });
          await waitForBoard(page, await serverTasks(s.url));
          // A changed row mid-flash and the log, as on a working board.
          await post(s.url, { task_id: 103, status: 'review' });
          await page.waitForSelector('tr[data-task-id="103"][data-version="2"]');
          await page.waitForFunction(() => document.getAnimations().every((a) => a.playState !== 'running'));
          assert.deepEqual(await axe(page), []);
          assert.deepEqual(problems, []);
        });
      }
    }

    test('axe-core: 0 violations on the sign-in state, and a token entered there gets the board going', async () => {
      const s = await server(['--jwt-secret', 'e2e-secret-that-is-long-enough-0123456789']);
      const { page } = await board(`${s.url}/`, { viewport: { width: 390, height: 844 }, ...AXE_CONTEXT }, 'closed');
      await page.waitForSelector('#auth:not([hidden])');
      assert.equal(await page.locator('#auth-title').innerText(), 'Sign-in required');
      assert.ok(await page.locator('#table-wrap').isHidden(), 'the empty table ("No tasks yet") is shown without a token');
      assert.deepEqual(await axe(page), []);
      await page.fill('#auth-form input[name="token"]', 'not-a-jwt');
      await page.click('#auth-form button');
      await page.waitForSelector('#auth-title:text("Token refused")');
    });

    test('reflow: no horizontal overflow at 320 px, the badge and the switch on screen', async () => {
      const s = await seeded();
      const { page } = await board(`${s.url}/`, { viewport: { width: 320, height: 640 } });
      await waitForBoard(page, await serverTasks(s.url));
      const layout = await page.evaluate(() => {
        const box = (/** @type {string} */ sel) => /** @type {HTMLElement} */ (document.querySelector(sel)).getBoundingClientRect().right;
        return { scrollWidth: document.documentElement.scrollWidth, badge: box('#conn-badge'), switch: box('#transport-switch'), row: box('tr[data-task-id="101"]') };
      });
      assert.ok(layout.scrollWidth <= 320, `page is ${layout.scrollWidth} px wide`);
      assert.ok(layout.badge <= 320 && layout.switch <= 320 && layout.row <= 320, JSON.stringify(layout));
      // A row shows its status on a phone.
      assert.ok(await page.locator('tr[data-task-id="101"] .pill').isVisible());
    });

    // Screenshots rewrite docs/*.png: a developer's run makes them, CI does not.
    const shotsSkip = process.env.CI === 'true' ? 'CI=true: screenshots are made by a developer run (npm run e2e) and committed' : false;
    test('screenshots for docs/: desktop, phone, dark', async () => {
      const s = await seeded();
      const shots = /** @type {const} */ ([
        ['board.png', { viewport: { width: 1280, height: 680 }, deviceScaleFactor: 2 }],
        ['board-phone.png', { viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true }],
        ['board-dark.png', { viewport: { width: 1280, height: 680 }, colorScheme: 'dark' }],
      ]);
      for (const [name, options] of shots) {
        const { page, context } = await board(`${s.url}/?transport=websocket`, options);
        await waitForBoard(page, await serverTasks(s.url));
        await post(s.url, { task_id: 102, data: { reviewers: 2 } });
        await page.waitForSelector('#log li[data-type="task_updated"]');
        await page.waitForFunction(() => document.getAnimations().every((a) => a.playState !== 'running'));
        await page.screenshot({ path: path.join(REPO_DIR, 'docs', name) });
        await context.close();
      }
    }, shotsSkip);

    for (const transport of /** @type {const} */ (['sse', 'websocket'])) {
      test(`liveness (${transport}): a frozen server (SIGSTOP) leaves live within 2.5 x keep-alive; after SIGCONT every update made meanwhile is shown`, async () => {
        const keepAliveMs = 1000;
        const s = await server(['--keep-alive', '1']);
        await post(s.url, { task_id: 1, status: 'todo' });
        const { page, problems } = await board(`${s.url}/?transport=${transport}`);
        await waitForBoard(page, await serverTasks(s.url));
        // Start from a fresh heartbeat, so the stop comes at a known point of the keep-alive.
        const frozenAt = Date.now();
        s.signal('SIGSTOP');
        // Updates made while it is frozen wait in its listen queue: they are
        // applied when it runs again, and the board must show them all.
        const meanwhile = Promise.all([1, 2, 3, 4, 5].map((i) => post(s.url, { task_id: i, status: `while-frozen-${i}` })));
        await page.waitForSelector('#conn-badge:not([data-state="open"])', { timeout: 5000 });
        const leftLiveMs = Date.now() - frozenAt;
        const note = await page.locator('#stale').innerText();
        s.signal('SIGCONT');
        await meanwhile;
        await waitForState(page, 'open', 15_000, transport);
        const expected = await serverTasks(s.url);
        await waitForBoard(page, expected);
        assert.deepEqual((await boardRows(page)).tasks, expected);
        perf[`liveness_${transport}`] = { keep_alive_ms: keepAliveMs, left_live_after_ms: leftLiveMs, limit_ms: 2.5 * keepAliveMs };
        console.log(`[${transport}] frozen server: the board left live after ${leftLiveMs} ms (keep-alive ${keepAliveMs} ms)`);
        // The watchdog counts from the last frame, which came before the stop.
        // The 500 ms on top are for timers and this test's polling on a loaded machine (2.1 to 2.6 s measured).
        assert.ok(leftLiveMs <= 2.5 * keepAliveMs + 500, `left live after ${leftLiveMs} ms`);
        assert.match(note, /^Not live since \d\d:\d\d:\d\d/);
        assert.deepEqual(problems.filter((p) => !/ERR_|status of/.test(p)), []);
      });
    }

    /**
     * Measures the page while `work` runs: frames (requestAnimationFrame),
     * long tasks (PerformanceObserver) and main-thread busy time (CDP
     * Performance.getMetrics TaskDuration).
     * @param {import('playwright-core').Page} page @param {() => Promise<void>} work
     */
    async function measure(page, work) {
      const cdp = await page.context().newCDPSession(page);
      await cdp.send('Performance.enable');
      const metric = async () => {
        const { metrics } = await cdp.send('Performance.getMetrics');
        const get = (/** @type {string} */ name) => metrics.find((m) => m.name === name)?.value ?? 0;
        return { task: get('TaskDuration'), script: get('ScriptDuration'), layout: get('LayoutDuration'), style: get('RecalcStyleDuration') };
      };
      await page.evaluate(() => {
        // @ts-ignore: test-only global
        const rec = (window.__perf = { frames: 0, longest: 0, long: 0, running: true, t0: performance.now(), t1: 0 });
        const tick = () => {
          if (!rec.running) return;
          rec.frames++;
          requestAnimationFrame(tick);
        };
        requestAnimationFrame(tick);
        new PerformanceObserver((list) => {
          for (const e of list.getEntries()) {
            rec.long++;
            rec.longest = Math.max(rec.longest, e.duration);
          }
        }).observe({ type: 'longtask' });
      });
      const load = os.loadavg()[0];
      // @ts-ignore: the board's own test hook
      const draws0 = await page.evaluate(() => window.taskstreamBoard.draws());
      const busy0 = await metric();
      const wall0 = performance.now();
      await work();
      const busy1 = await metric();
      const wall1 = performance.now();
      // @ts-ignore: the board's own test hook
      const draws = (await page.evaluate(() => window.taskstreamBoard.draws())) - draws0;
      const rec = await page.evaluate(() => {
        // @ts-ignore: test-only global
        const r = window.__perf;
        r.running = false;
        r.t1 = performance.now();
        return r;
      });
      await cdp.detach();
      const seconds = (rec.t1 - rec.t0) / 1000;
      const round = (/** @type {number} */ x) => Math.round(x * 10) / 10;
      const wall = (wall1 - wall0) / 1000;
      const pct = (/** @type {'task' | 'script' | 'layout' | 'style'} */ k) => round((100 * (busy1[k] - busy0[k])) / wall);
      return {
        seconds: round(seconds),
        fps: round(rec.frames / seconds),
        main_thread_busy_pct: pct('task'),
        script_pct: pct('script'),
        layout_pct: pct('layout'),
        style_pct: pct('style'),
        long_tasks: rec.long,
        longest_task_ms: Math.round(rec.longest),
        board_draws: draws,
        animation_frames: rec.frames,
        load_average_at_start: round(load),
      };
    }

    test('figures: 300 tasks at 100 updates/s, and a burst of 2,000 updates', async () => {
      const s = await server();
      await publishMany(s.url, 300, (i) => ({ task_id: i + 1, title: `Task number ${i + 1}`, status: 'todo', assignee: `dev${i % 7}` }));
      const { page, problems } = await board(`${s.url}/`, { viewport: { width: 1280, height: 800 } });
      await waitForBoard(page, await serverTasks(s.url));
      const statuses = ['todo', 'in_progress', 'review', 'completed'];
      const steady = await measure(page, () => publishAtRate(s.url, 100, STEADY_S, (i) => ({ task_id: 1 + (i % 50), status: statuses[i % 4] })));
      await waitForBoard(page, await serverTasks(s.url));
      perf.steady_300_tasks_100_per_s = steady;
      console.log(`300 tasks, 100 updates/s: ${JSON.stringify(steady)}`);
      const burst = await measure(page, async () => {
        await publishMany(s.url, 2000, (i) => ({ task_id: 1 + (i % 300), status: statuses[(i + 1) % 4] }), 32);
        await waitForBoard(page, await serverTasks(s.url), 20_000);
      });
      const expected = await serverTasks(s.url);
      assert.deepEqual((await boardRows(page)).tasks, expected, 'not every event of the burst was applied');
      perf.burst_2000_updates_300_tasks = burst;
      console.log(`burst of 2,000 on 300 tasks: ${JSON.stringify(burst)}`);
      // One draw per frame at most, whatever the event rate: the point of the design.
      assert.ok(steady.board_draws <= steady.animation_frames + 1, JSON.stringify(steady));
      assert.ok(burst.board_draws <= burst.animation_frames + 1, JSON.stringify(burst));
      if (figuresAsserted(steady)) {
        assert.ok(steady.main_thread_busy_pct <= 35, `main thread ${steady.main_thread_busy_pct} % busy at 100 updates/s`);
        assert.ok(steady.fps >= 55, `${steady.fps} fps at 100 updates/s`);
        assert.ok(burst.longest_task_ms < 100, `longest task ${burst.longest_task_ms} ms in the burst`);
      }
      assert.deepEqual(problems, []);
    });

    test('figures: 5,000 tasks at 50 updates/s, and the filter box', async () => {
      const s = await server();
      await publishMany(s.url, 5000, (i) => ({ task_id: i + 1, title: `Task number ${i + 1}`, status: 'todo' }), 32);
      const { page, problems } = await board(`${s.url}/`, { viewport: { width: 1280, height: 800 } });
      await waitForBoard(page, await serverTasks(s.url), 20_000);
      const inDom = (await boardRows(page)).inDom;
      assert.ok(inDom < 100, `${inDom} rows in the DOM for 5,000 tasks`);
      const large = await measure(page, () => publishAtRate(s.url, 50, STEADY_S, (i) => ({ task_id: 1 + ((i * 97) % 5000), status: i % 2 ? 'review' : 'in_progress' })));
      await waitForBoard(page, await serverTasks(s.url), 20_000);
      perf.steady_5000_tasks_50_per_s = { ...large, rows_in_dom: inDom };
      console.log(`5,000 tasks, 50 updates/s: ${JSON.stringify(large)}`);
      // The filter: one task out of 5,000, typed.
      const t0 = Date.now();
      await page.fill('#filter', 'task number 4321');
      await page.waitForFunction(() => document.querySelectorAll('#task-rows tr[data-task-id]').length === 1);
      assert.equal(await page.locator('#task-rows tr[data-task-id]').getAttribute('data-task-id'), '4321');
      perf.filter_5000_tasks_ms = Date.now() - t0;
      // Scrolling to the end shows the last rows.
      await page.fill('#filter', '');
      await page.locator('#table-wrap').evaluate((e) => e.scrollTo(0, e.scrollHeight));
      await page.waitForSelector('tr[data-task-id="5000"]');
      assert.ok(large.board_draws <= large.animation_frames + 1, JSON.stringify(large));
      if (figuresAsserted(large)) assert.ok(large.fps >= 50, `${large.fps} fps with 5,000 tasks at 50 updates/s`);
      assert.deepEqual(problems, []);
    });
  });
}
