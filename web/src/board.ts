/**
 * The live task board served at `/`: a windowed table of every task with a
 * filter, a connection badge with "not live since", a transport switch (SSE /
 * WebSocket), sign-in when the server wants a token, a form that updates a
 * task, and a log of raw events. All of it runs on one {@link taskBoard}
 * (one EventSource or one WebSocket), from the library beside it.
 *
 * Rendering is per animation frame, not per event: events only mark rows
 * dirty, and one `requestAnimationFrame` writes the rows that changed and are
 * on screen, the counters and the newest log lines; while events stream in,
 * such a frame comes at most every 100 ms (see {@link Frame}). Only the rows in the
 * scroll window (plus a margin) exist in the DOM, so 5,000 tasks cost what
 * 40 do.
 *
 * The page reads its own query parameters: `transport` (`sse`, the default,
 * or `websocket`; the switch rewrites it), `token` (or `access_token`: a JWT
 * for a server with auth) and `task_id` (only these tasks), so
 * `/?transport=websocket&token=...&task_id=101` works.
 */
import './board.css';
import { Subscription } from 'rxjs';
import {
  type BoardState,
  type ConnectionInfo,
  type ConnectionState,
  type Task,
  type TaskBoard,
  type TaskEvent,
  type TaskPatch,
  TaskstreamError,
  type Transport,
  taskBoard,
} from './taskstream';

/** The log keeps this many lines: beyond that nobody reads them, and each one costs layout. */
const LOG_LINES = 50;
/** Rows rendered above and below the visible window, so a fast scroll shows no blank. */
const OVERSCAN = 8;
/** What the event stream changes is drawn at most this often (see {@link Frame}). */
const frameMsParam = Number(new URLSearchParams(location.search).get('frame_ms') ?? NaN);
const DATA_FRAME_MS = Number.isFinite(frameMsParam) && frameMsParam >= 0 ? frameMsParam : 100;
/** How long a changed row keeps its marker. */
const FRESH_MS = 1000;
/** The spoken summary of changes comes at most this often. */
const ANNOUNCE_EVERY_MS = 5000;

const BADGE_LABEL: Record<ConnectionState, string> = {
  connecting: 'connecting',
  open: 'live',
  reconnecting: 'reconnecting',
  closed: 'closed',
};

const TRANSPORT_LABEL: Record<Transport, string> = { sse: 'SSE', websocket: 'WebSocket' };

/** `?transport=`: `websocket` (or `ws`) or the default, `sse`. */
function parseTransport(value: string | null): Transport {
  return value === 'websocket' || value === 'ws' ? 'websocket' : 'sse';
}

function byId<T extends HTMLElement>(id: string): T {
  const el = document.getElementById(id);
  // The ids are in index.html, next to this file; a missing one is a build bug.
  if (!el) throw new Error(`#${id} missing from index.html`);
  return el as T;
}

function el<K extends keyof HTMLElementTagNameMap>(tag: K, className?: string, text?: string): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Integers in numeric order first, then other ids alphabetically: rows don't jump around. */
function compareKeys(a: string, b: string): number {
  const na = /^[1-9]\d*$/.test(a);
  const nb = /^[1-9]\d*$/.test(b);
  if (na && nb) return a.length - b.length || (a < b ? -1 : a > b ? 1 : 0);
  if (na !== nb) return na ? -1 : 1;
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Where `key` goes in the sorted `keys`. */
function insertAt(keys: readonly string[], key: string): number {
  let lo = 0;
  let hi = keys.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (compareKeys(keys[mid]!, key) < 0) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** A stable colour class for a status, so a glance tells them apart. */
function statusClass(status: string | undefined): string {
  const s = (status ?? '').toLowerCase();
  if (!s) return 'status-none';
  if (/(complete|done|closed|shipped|resolved)/.test(s)) return 'status-done';
  if (/(progress|doing|started|active|running)/.test(s)) return 'status-progress';
  if (/(review|qa|testing)/.test(s)) return 'status-review';
  if (/(block|fail|error|stuck)/.test(s)) return 'status-blocked';
  return 'status-todo';
}

/** The viewer's local time with its zone ("14:03:27 CET"): the server's times are UTC. */
const TIME = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23', timeZoneName: 'short' });
const DATE_TIME = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'long' });

function timeOf(updatedAt: string | undefined): string {
  if (!updatedAt) return '';
  const d = new Date(updatedAt);
  return Number.isNaN(d.getTime()) ? updatedAt : TIME.format(d);
}

function fullTimeOf(updatedAt: string | undefined): string {
  if (!updatedAt) return '';
  const d = new Date(updatedAt);
  return Number.isNaN(d.getTime()) ? updatedAt : `${DATE_TIME.format(d)} (${updatedAt})`;
}

function setText(node: HTMLElement, text: string): void {
  if (node.textContent !== text) node.textContent = text;
}

function setHeight(spacer: HTMLTableRowElement, px: number): void {
  const td = spacer.firstElementChild as HTMLElement;
  const value = `${px}px`;
  if (td.style.height !== value) td.style.height = value;
}

/**
 * One animation frame for everything that changed since the last one. What the stream changes is
 * drawn at most every `DATA_FRAME_MS`: a frame that touches the table and the log costs about as
 * much for one change as for ten (style, layout, paint and raster of the same region), and nobody
 * reads a row that changes more often. A scroll, a resize or the filter box is drawn at the next
 * frame regardless, so the page still follows the hand at the display's rate.
 */
class Frame {
  private pending: 'frame' | 'timer' | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private last = -Infinity;
  private readonly jobs = new Set<() => void>();
  /** Whether the next frame draws something of the stream's (not only a scroll or a timer). */
  private streamed = false;

  /** `urgent`: a scroll, a resize, the filter, a timer: drawn at the next frame, not held back. */
  schedule(job: () => void, urgent = false): void {
    this.jobs.add(job);
    if (!urgent) this.streamed = true;
    if (this.pending === 'frame') return;
    const wait = urgent ? 0 : this.last + DATA_FRAME_MS - performance.now();
    if (wait <= 0) {
      clearTimeout(this.timer);
      this.pending = 'frame';
      requestAnimationFrame(this.run);
    } else if (this.pending === undefined) {
      this.pending = 'timer';
      this.timer = setTimeout(() => {
        this.pending = 'frame';
        requestAnimationFrame(this.run);
      }, wait);
    }
  }

  private readonly run = (now: number): void => {
    this.pending = undefined;
    // Only a frame that drew the stream's changes holds the next ones back.
    if (this.streamed) this.last = now;
    this.streamed = false;
    const jobs = [...this.jobs];
    this.jobs.clear();
    for (const j of jobs) j();
  };
}

const frame = new Frame();

// ---------------------------------------------------------------------------
// Tasks table: windowed, filtered, written once per frame

class TaskTable {
  private readonly body = byId<HTMLTableSectionElement>('task-rows');
  private readonly table = byId('tasks');
  private readonly wrap = byId('table-wrap');
  private readonly empty = byId('empty');
  private readonly count = byId('task-count');
  private readonly lastId = byId('last-event-id');
  private readonly filterBox = byId<HTMLInputElement>('filter');
  private readonly topSpacer = this.spacer();
  private readonly bottomSpacer = this.spacer();

  /** The state as of the last frame drawn, and what changed since. */
  private tasks: ReadonlyMap<string, Task> = new Map();
  private lastEventId: string | null = null;
  private sorted: string[] = [];
  private known = new Set<string>();
  private shown: string[] = [];
  private structural = true;
  private refill = false;
  private readonly dirty = new Set<string>();
  private filter = '';
  /** The rows in the DOM, by key. */
  private readonly rows = new Map<string, HTMLTableRowElement>();
  private rowHeight = 0;
  private headHeight = 0;
  private viewHeight = 0;
  private scrollTop = 0;
  /** Rows marked as just changed, and until when (`performance.now()`). */
  private readonly fresh = new Map<HTMLTableRowElement, number>();
  private freshTimer: ReturnType<typeof setTimeout> | undefined;
  /** The task each row in the DOM shows. */
  private readonly filled = new WeakMap<HTMLTableRowElement, Task>();

  constructor(private readonly onChanged: (tasks: Task[]) => void) {
    this.wrap.addEventListener(
      'scroll',
      () => {
        // Read here, where layout is clean: a read in the frame, after the log's writes, would
        // force a second layout of the whole page every frame.
        this.scrollTop = this.wrap.scrollTop;
        frame.schedule(this.draw, true);
      },
      { passive: true },
    );
    new ResizeObserver(() => {
      this.measure();
      frame.schedule(this.draw, true);
    }).observe(this.wrap);
    this.filterBox.addEventListener('input', () => {
      this.filter = this.filterBox.value.trim().toLowerCase();
      this.structural = true;
      frame.schedule(this.draw, true);
    });
    this.measure();
  }

  /** Takes a board emission; the DOM follows at the next frame. */
  push(state: BoardState): void {
    const { change } = state;
    if (change.kind === 'snapshot') {
      this.sorted = [...state.tasks.keys()].sort(compareKeys);
      this.known = new Set(this.sorted);
      this.structural = true;
      // After a reload a task may have the same version with other content
      // (a restarted in-memory server), so a snapshot refills every row.
      this.refill = true;
    } else if (change.kind === 'updated') {
      if (!this.known.has(change.key)) {
        this.known.add(change.key);
        this.sorted.splice(insertAt(this.sorted, change.key), 0, change.key);
        this.structural = true;
      }
      this.dirty.add(change.key);
    } else {
      const i = this.known.delete(change.key) ? this.sorted.indexOf(change.key) : -1;
      if (i >= 0) this.sorted.splice(i, 1);
      this.structural = true;
    }
    this.tasks = state.tasks;
    this.lastEventId = state.lastEventId;
    frame.schedule(this.draw);
  }

  /** What the last frame drew, for tests and scripts: every task, filtered or not. */
  drawn(): Array<{ key: string; version: string; status: string; assignee: string }> {
    return this.drawnKeys.map((key) => {
      const t = this.drawnTasks.get(key)!;
      return { key, version: String(t.version), status: t.status ?? '', assignee: t.assignee ?? '' };
    });
  }

  private drawnTasks: ReadonlyMap<string, Task> = new Map();
  private drawnKeys: string[] = [];

  private spacer(): HTMLTableRowElement {
    const tr = el('tr', 'spacer');
    tr.setAttribute('aria-hidden', 'true');
    const td = el('td');
    td.colSpan = 6;
    tr.append(td);
    return tr;
  }

  private measure(): void {
    this.rowHeight = parseFloat(getComputedStyle(this.wrap).getPropertyValue('--row-h')) || 40;
    this.viewHeight = this.wrap.clientHeight || window.innerHeight;
    // Read here (on resize), not per frame: reading layout in a frame forces it.
    this.headHeight = this.body.offsetTop || 0;
    this.scrollTop = this.wrap.scrollTop;
  }

  private matches(key: string): boolean {
    if (!this.filter) return true;
    const t = this.tasks.get(key);
    if (!t) return false;
    return `${key} ${t.title ?? ''} ${t.status ?? ''} ${t.assignee ?? ''}`.toLowerCase().includes(this.filter);
  }

  /** Frames drawn, for tests: at most one per animation frame however many events came. */
  draws = 0;

  private readonly draw = (): void => {
    this.draws += 1;
    const changed = [...this.dirty];
    this.dirty.clear();
    // A filtered view changes shape when a changed task enters or leaves it.
    if (this.filter && changed.length > 0) this.structural = true;
    if (this.structural) this.shown = this.filter ? this.sorted.filter((k) => this.matches(k)) : this.sorted;
    this.unmarkOlderThan(performance.now());
    this.window(changed);
    this.drawnTasks = this.tasks;
    if (this.structural) this.drawnKeys = this.sorted.slice();
    // Only what changed is written: every write costs style and layout work.
    setText(this.count, String(this.tasks.size));
    setText(this.lastId, this.lastEventId ?? '–');
    const empty = this.shown.length === 0;
    if (this.empty.hidden === empty) this.empty.hidden = !empty;
    const emptyKind = this.filter ? 'filter' : 'none';
    if (empty && this.empty.dataset.kind !== emptyKind) {
      this.empty.dataset.kind = emptyKind;
      if (this.filter) this.empty.textContent = 'No task matches the filter.';
      else this.empty.replaceChildren('No tasks yet. POST one to ', el('code', undefined, '/update_task'), ' or use the form.');
    }
    if (changed.length > 0) this.onChanged(changed.map((k) => this.tasks.get(k)).filter((t): t is Task => t !== undefined));
    this.structural = false;
    this.refill = false;
  };

  /** Puts exactly the rows of the scroll window in the DOM, filling new and changed ones. */
  private window(changed: string[]): void {
    const h = this.rowHeight;
    const total = this.shown.length;
    // The table's header sits above the rows inside the scroller.
    const head = this.headHeight;
    const top = Math.max(0, this.scrollTop - head);
    const first = Math.max(0, Math.floor(top / h) - OVERSCAN);
    const last = Math.min(total, Math.ceil((top + this.viewHeight) / h) + OVERSCAN);
    const keys = this.shown.slice(first, last);
    const wanted = new Set(keys);
    for (const [key, row] of this.rows) {
      if (!wanted.has(key)) {
        row.remove();
        this.rows.delete(key);
        this.fresh.delete(row);
      }
    }
    const changedSet = new Set(changed);
    const order: HTMLTableRowElement[] = [];
    let moved = false;
    for (const key of keys) {
      const task = this.tasks.get(key);
      let row = this.rows.get(key);
      if (!row) {
        row = this.createRow(key);
        this.rows.set(key, row);
        moved = true;
        if (task) this.fill(row, task, false);
      } else if (task && (this.refill || changedSet.has(key))) {
        this.fill(row, task, changedSet.has(key) && row.dataset.version !== String(task.version));
      }
        const index = String(first + order.length + 2);
      if (row.getAttribute('aria-rowindex') !== index) row.setAttribute('aria-rowindex', index);
      order.push(row);
    }
    setHeight(this.topSpacer, first * h);
    setHeight(this.bottomSpacer, (total - last) * h);
    const rowCount = String(total + 1);
    if (this.table.getAttribute('aria-rowcount') !== rowCount) this.table.setAttribute('aria-rowcount', rowCount);
    if (moved || this.structural) this.body.replaceChildren(this.topSpacer, ...order, this.bottomSpacer);
  }

  private createRow(key: string): HTMLTableRowElement {
    const row = el('tr', 'row');
    row.dataset.taskId = key;
    const id = el('td', 'id');
    // The change marker, shown for a moment after a change (see `mark`).
    id.append(el('span', 'mark'), el('span', 'id-text'));
    id.firstElementChild!.setAttribute('aria-hidden', 'true');
    row.append(id, el('td', 'title'), el('td', 'status'), el('td', 'assignee'), el('td', 'num version'), el('td', 'time'));
    return row;
  }

  private fill(row: HTMLTableRowElement, task: Task, changed: boolean): void {
    const [id, title, status, assignee, version, time] = row.cells as unknown as HTMLTableCellElement[];
    // Only the cells whose text changed are written: an update usually changes the status, the
    // version and the time, and every cell written costs its shaping, layout and paint.
    const was = this.filled.get(row);
    this.filled.set(row, task);
    const differs = (field: keyof Task) => was === undefined || was[field] !== task[field];
    if (differs('task_id')) {
      id!.lastChild!.textContent = String(task.task_id);
      id!.title = String(task.task_id);
    }
    if (differs('title')) {
      title!.textContent = task.title ?? '';
      // The whole text, for a title the column cuts.
      title!.title = task.title ?? '';
    }
    if (differs('status')) {
      const pill = el('span', `pill ${statusClass(task.status)}`, task.status ?? '—');
      pill.title = task.status ?? '';
      status!.replaceChildren(pill);
      row.dataset.status = task.status ?? '';
    }
    if (differs('assignee')) {
      assignee!.textContent = task.assignee || 'unassigned';
      assignee!.title = task.assignee ?? '';
      assignee!.classList.toggle('unassigned', !task.assignee);
      row.dataset.assignee = task.assignee ?? '';
    }
    version!.textContent = `v${task.version}`;
    if (differs('updated_at')) {
      time!.textContent = timeOf(task.updated_at);
      time!.title = fullTimeOf(task.updated_at);
    }
    // Last, so a test waiting on data-version sees a fully written row.
    row.dataset.version = String(task.version);
    if (changed) this.mark(row);
  }

  /**
   * Marks a changed row for `FRESH_MS`. A marker that appears and goes, written in the data
   * frames that run anyway, not an animation: a fade on every changed row made the page produce
   * and composite a frame 60 times a second for as long as updates came (16 % of the main thread
   * at 100 updates/s), and it is also what `prefers-reduced-motion` asks for.
   */
  private mark(row: HTMLTableRowElement): void {
    row.classList.add('fresh');
    this.fresh.set(row, performance.now() + FRESH_MS);
    this.unmarkLater();
  }

  private unmarkOlderThan(now: number): void {
    for (const [row, until] of this.fresh) {
      if (until > now) continue;
      row.classList.remove('fresh');
      this.fresh.delete(row);
    }
    this.unmarkLater();
  }

  /** One timer, for the earliest marker to go; the draw it asks for arms the next. */
  private unmarkLater(): void {
    if (this.freshTimer !== undefined || this.fresh.size === 0) return;
    let next = Infinity;
    for (const until of this.fresh.values()) next = Math.min(next, until);
    this.freshTimer = setTimeout(() => {
      this.freshTimer = undefined;
      frame.schedule(this.draw, true);
    }, next - performance.now());
  }
}

// ---------------------------------------------------------------------------
// Badge, "not live since", spoken summary, log, form

function clock(ms: number): string {
  return new Date(ms).toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23' });
}

function renderConnection(info: ConnectionInfo, transport: Transport, everOpen: boolean): void {
  const badge = byId('conn-badge');
  badge.dataset.state = info.state;
  badge.dataset.transport = transport;
  badge.title = `connection: ${info.state} over ${TRANSPORT_LABEL[transport]}${info.reason ? ` (${info.reason})` : ''}`;
  badge.querySelector('.label')!.textContent = BADGE_LABEL[info.state];
  badge.querySelector('.via')!.textContent = TRANSPORT_LABEL[transport];
  const card = byId('tasks-card');
  card.dataset.live = String(info.state === 'open');
  const stale = byId('stale');
  // Dimmed rows with the time they stopped being live: what is on screen may be old.
  if (info.state !== 'open' && everOpen && info.state !== 'closed') {
    const retry = info.nextRetryAt ? `, next try at ${clock(info.nextRetryAt)}` : '';
    stale.textContent = `Not live since ${clock(info.since)}: ${info.state}${info.attempt ? ` (attempt ${info.attempt}${retry})` : retry}${info.reason ? `. ${info.reason}` : ''}`;
    stale.hidden = false;
  } else if (info.state === 'closed' && everOpen && info.error) {
    stale.textContent = `Not live since ${clock(info.since)}: ${info.error.message}`;
    stale.hidden = false;
  } else {
    stale.hidden = true;
  }
}

/** A throttled, polite summary of task changes for screen readers ("3 tasks changed: 101 completed, ..."). */
class Announcer {
  private readonly region = byId('summary');
  private readonly changed = new Map<string, Task>();
  private timer: ReturnType<typeof setTimeout> | undefined;

  add(tasks: Task[]): void {
    for (const t of tasks) this.changed.set(String(t.task_id), t);
    this.timer ??= setTimeout(() => this.say(), ANNOUNCE_EVERY_MS);
  }

  private say(): void {
    this.timer = undefined;
    const all = [...this.changed.values()];
    this.changed.clear();
    if (all.length === 0) return;
    const named = all.slice(0, 3).map((t) => `${t.task_id} ${t.status ?? 'updated'}`);
    const more = all.length > 3 ? `, and ${all.length - 3} more` : '';
    this.region.textContent = `${all.length} ${all.length === 1 ? 'task' : 'tasks'} changed: ${named.join(', ')}${more}`;
  }
}

/**
 * The log: events queue up as they are and the newest `LOG_LINES` become lines once per frame,
 * so a burst builds 50 lines, not one per event.
 */
class Log {
  private readonly list = byId<HTMLOListElement>('log');
  private queue: Array<() => HTMLLIElement> = [];

  event(ev: TaskEvent): void {
    this.add(() => {
      const line = el('li', `log-line type-${ev.type}`);
      line.dataset.id = ev.id;
      line.dataset.type = ev.type;
      line.title = JSON.stringify(ev.data);
      // The line has room for little: not for the `event` field, which repeats the type.
      const { event: _event, ...fields } = ev.data as unknown as Record<string, unknown>;
      line.append(el('span', 'log-id', ev.id), el('span', 'log-type', ev.type), el('code', 'log-data', JSON.stringify(fields)));
      return line;
    });
  }

  note(className: string, message: string): void {
    this.add(() => el('li', `log-line ${className}`, message));
  }

  private add(line: () => HTMLLIElement): void {
    this.queue.push(line);
    // Lines older than the cap would be removed unseen: don't keep them.
    if (this.queue.length > 2 * LOG_LINES) this.queue.splice(0, this.queue.length - LOG_LINES);
    frame.schedule(this.flush);
  }

  private readonly flush = (): void => {
    const lines = this.queue.slice(-LOG_LINES).reverse().map((make) => make());
    this.queue = [];
    this.list.prepend(...lines);
    while (this.list.childElementCount > LOG_LINES) this.list.lastElementChild!.remove();
  };
}

/** The form publishes through the board: on its socket when on WebSocket, else POST /update_task. */
function wireForm(publish: (patch: TaskPatch) => ReturnType<TaskBoard['updateTask']>): void {
  const form = byId<HTMLFormElement>('update-form');
  const result = byId<HTMLOutputElement>('form-result');
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const fields = new FormData(form);
    const text = (name: string) => String(fields.get(name) ?? '').trim();
    const rawId = text('task_id');
    // Decimal integers without a leading zero go as numbers, as the server prints them.
    const patch: TaskPatch = { task_id: /^[1-9]\d{0,15}$/.test(rawId) && Number.isSafeInteger(Number(rawId)) ? Number(rawId) : rawId };
    for (const name of ['status', 'assignee', 'title'] as const) {
      const value = text(name);
      if (value) patch[name] = value;
    }
    const button = form.querySelector('button')!;
    button.disabled = true;
    result.className = '';
    delete result.dataset.via;
    result.textContent = 'sending…';
    publish(patch)
      .then(
        (res) => {
          result.className = 'ok';
          result.dataset.via = res.via;
          const via = res.via === 'websocket' ? 'over the WebSocket' : 'by POST';
          result.textContent = `accepted ${via}: task ${res.task.task_id} v${res.task.version} (event ${res.event_id})`;
        },
        (err: unknown) => {
          result.className = 'err';
          result.textContent = err instanceof TaskstreamError ? err.message : `request failed: ${String(err)}`;
        },
      )
      .finally(() => {
        button.disabled = false;
      });
  });
}

/** Whether an error means "the token": missing, invalid, expired or not allowed. */
function isAuthError(err: unknown): err is TaskstreamError {
  return err instanceof TaskstreamError && (err.status === 401 || err.status === 403 || err.closeCode === 1008);
}

function showAuth(err: TaskstreamError | undefined, hadToken: boolean): void {
  const panel = byId('auth');
  panel.hidden = !err;
  byId('table-wrap').hidden = !!err;
  if (!err) return;
  const expired = /expired/i.test(err.message);
  byId('auth-title').textContent = expired ? 'Token expired' : hadToken ? 'Token refused' : 'Sign-in required';
  byId('auth-text').textContent = expired
    ? 'The board stopped when its token expired. Paste a new token to carry on.'
    : hadToken
      ? `The server refused the token: ${err.message}`
      : 'This server needs an access token (a JWT) to show its tasks.';
}

// ---------------------------------------------------------------------------

function main(): void {
  const params = new URLSearchParams(location.search);
  let accessToken = params.get('token') || params.get('access_token') || undefined;
  const taskIds = params.getAll('task_id').flatMap((v) => v.split(',')).filter(Boolean);
  const base = '';
  const announcer = new Announcer();
  const table = new TaskTable((tasks) => announcer.add(tasks));
  const log = new Log();
  const radios = [...document.querySelectorAll<HTMLInputElement>('#transport-switch input[name="transport"]')];
  // For tests and scripts: the rows the last frame drew (the DOM holds only the visible ones).
  (window as unknown as { taskstreamBoard: unknown }).taskstreamBoard = { rows: () => table.drawn(), draws: () => table.draws };

  let board: TaskBoard | undefined;
  let transport: Transport = parseTransport(params.get('transport'));
  let running = new Subscription();

  /** Runs the page on a board over this transport; the previous board, if any, closes first. */
  const start = (t: Transport) => {
    transport = t;
    // The old board's own 'closed' is not shown: its state$ goes first.
    running.unsubscribe();
    running = new Subscription();
    showAuth(undefined, false);
    for (const r of radios) r.checked = r.value === t;
    const b = taskBoard(base, {
      transport: t,
      ...(accessToken ? { accessToken } : {}),
      ...(taskIds.length ? { taskIds } : {}),
      backoff: { initialDelayMs: 250, maxDelayMs: 10_000 },
    });
    board = b;
    let everOpen = false;
    running.add(
      b.info$.subscribe((info) => {
        if (info.state === 'open') everOpen = true;
        renderConnection(info, t, everOpen);
      }),
    );
    running.add(b.events$.subscribe((ev) => log.event(ev)));
    running.add(
      b.subscribe({
        next: (state) => table.push(state),
        error: (err: unknown) => {
          log.note('log-error', err instanceof Error ? err.message : String(err));
          if (isAuthError(err)) showAuth(err, accessToken !== undefined);
        },
      }),
    );
  };

  for (const radio of radios) {
    radio.addEventListener('change', () => {
      if (!radio.checked) return;
      const t = parseTransport(radio.value);
      const url = new URL(location.href);
      url.searchParams.set('transport', t);
      history.replaceState(history.state, '', url);
      log.note('log-note', `switched to ${TRANSPORT_LABEL[t]}`);
      start(t);
    });
  }

  byId<HTMLFormElement>('auth-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const form = e.currentTarget as HTMLFormElement;
    const value = String(new FormData(form).get('token') ?? '').trim();
    if (!value) return;
    // Kept in memory only: a token in the URL would land in the history.
    accessToken = value;
    form.reset();
    log.note('log-note', 'signed in with a new token');
    start(transport);
  });

  start(transport);
  wireForm((patch) => board!.updateTask(patch));
}

main();
