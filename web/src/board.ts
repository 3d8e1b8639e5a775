/**
 * The live task board served at `/`: a table of every task, a connection
 * badge, a transport switch (SSE / WebSocket), a form that updates a task,
 * and a log of raw events. All of it runs on one {@link taskBoard} (one
 * EventSource or one WebSocket), from the library beside it.
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
  type ConnectionState,
  type ServerEvent,
  type Task,
  type TaskBoard,
  type TaskPatch,
  TaskstreamError,
  type Transport,
  taskBoard,
} from './taskstream';

const LOG_LINES = 200;

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

function timeOf(updatedAt: string | undefined): string {
  if (!updatedAt) return '';
  const d = new Date(updatedAt);
  return Number.isNaN(d.getTime()) ? updatedAt : d.toISOString().slice(11, 23);
}

// ---------------------------------------------------------------------------
// Tasks table

class TaskTable {
  private readonly rows = new Map<string, HTMLTableRowElement>();
  private readonly body = byId<HTMLTableSectionElement>('task-rows');
  private readonly empty = byId('empty');
  private readonly count = byId('task-count');
  private readonly lastId = byId('last-event-id');

  render(state: BoardState): void {
    const { change, tasks } = state;
    const row = change.kind === 'updated' ? this.rows.get(change.key) : undefined;
    if (row) {
      // The common case: one known task changed. Touch one row only.
      this.fill(row, change.kind === 'updated' ? change.task : undefined, true);
    } else {
      this.reconcile(tasks, change.kind === 'snapshot');
    }
    this.count.textContent = String(tasks.size);
    this.lastId.textContent = state.lastEventId ?? '–';
    this.empty.hidden = tasks.size > 0;
  }

  private reconcile(tasks: ReadonlyMap<string, Task>, refill: boolean): void {
    for (const [key, row] of this.rows) {
      if (!tasks.has(key)) {
        row.remove();
        this.rows.delete(key);
      }
    }
    let added = false;
    for (const [key, task] of tasks) {
      let row = this.rows.get(key);
      if (!row) {
        row = this.createRow(key);
        this.rows.set(key, row);
        added = true;
        this.fill(row, task, false);
      } else if (refill || row.dataset.version !== String(task.version)) {
        // After a reload a task may have the same version with other content
        // (a restarted in-memory server), so a snapshot refills every row.
        this.fill(row, task, row.dataset.version !== String(task.version));
      }
    }
    if (added) {
      const keys = [...this.rows.keys()].sort(compareKeys);
      for (const key of keys) this.body.append(this.rows.get(key)!);
    }
  }

  private createRow(key: string): HTMLTableRowElement {
    const row = el('tr');
    row.dataset.taskId = key;
    row.append(el('td', 'id'), el('td', 'title'), el('td', 'status'), el('td', 'assignee'), el('td', 'num version'), el('td', 'time'));
    return row;
  }

  private fill(row: HTMLTableRowElement, task: Task | undefined, flash: boolean): void {
    if (!task) return;
    const [id, title, status, assignee, version, time] = row.cells as unknown as HTMLTableCellElement[];
    id!.textContent = String(task.task_id);
    title!.textContent = task.title ?? '';
    const pill = el('span', `pill ${statusClass(task.status)}`, task.status ?? '—');
    status!.replaceChildren(pill);
    assignee!.textContent = task.assignee || 'unassigned';
    assignee!.classList.toggle('unassigned', !task.assignee);
    version!.textContent = String(task.version);
    time!.textContent = timeOf(task.updated_at);
    time!.title = task.updated_at ?? '';
    row.dataset.status = task.status ?? '';
    row.dataset.assignee = task.assignee ?? '';
    // Last, so a test waiting on data-version sees a fully written row.
    row.dataset.version = String(task.version);
    if (flash) this.flash(row);
  }

  private readonly flashes = new WeakMap<HTMLTableRowElement, Animation>();

  /**
   * Highlights a changed row. A Web Animation, restarted by cancelling the
   * previous one: restarting a CSS animation needs a forced layout per event,
   * about six times the layout and style work of this.
   */
  private flash(row: HTMLTableRowElement): void {
    this.flashes.get(row)?.cancel();
    if (typeof row.animate !== 'function') return;
    this.flashes.set(row, row.animate([{ backgroundColor: '#fff3c4' }, { backgroundColor: 'transparent' }], { duration: 1200, easing: 'ease-out' }));
  }
}

// ---------------------------------------------------------------------------
// Badge, log, form

function renderBadge(state: ConnectionState, transport: Transport): void {
  const badge = byId('conn-badge');
  badge.dataset.state = state;
  badge.dataset.transport = transport;
  badge.title = `connection: ${state}, over ${TRANSPORT_LABEL[transport]}`;
  badge.querySelector('.label')!.textContent = BADGE_LABEL[state];
  badge.querySelector('.via')!.textContent = TRANSPORT_LABEL[transport];
}

function appendLog(ev: ServerEvent): void {
  const log = byId<HTMLOListElement>('log');
  const line = el('li', `log-line type-${ev.type}`);
  line.dataset.id = ev.id;
  line.dataset.type = ev.type;
  line.append(el('span', 'log-id', ev.id), el('span', 'log-type', ev.type), el('code', 'log-data', JSON.stringify(ev.data)));
  log.prepend(line);
  while (log.childElementCount > LOG_LINES) log.lastElementChild!.remove();
}

function logLine(className: string, message: string): void {
  const log = byId<HTMLOListElement>('log');
  log.prepend(el('li', `log-line ${className}`, message));
  while (log.childElementCount > LOG_LINES) log.lastElementChild!.remove();
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

// ---------------------------------------------------------------------------

function main(): void {
  const params = new URLSearchParams(location.search);
  const accessToken = params.get('token') || params.get('access_token') || undefined;
  const taskIds = params.getAll('task_id').flatMap((v) => v.split(',')).filter(Boolean);
  const base = '';
  const table = new TaskTable();
  const radios = [...document.querySelectorAll<HTMLInputElement>('#transport-switch input[name="transport"]')];

  let board: TaskBoard | undefined;
  let running = new Subscription();

  /** Runs the page on a board over this transport; the previous board, if any, closes first. */
  const start = (transport: Transport) => {
    // The old board's own 'closed' is not shown: its state$ goes first.
    running.unsubscribe();
    running = new Subscription();
    for (const r of radios) r.checked = r.value === transport;
    const b = taskBoard(base, {
      transport,
      ...(accessToken ? { accessToken } : {}),
      ...(taskIds.length ? { taskIds } : {}),
      backoff: { initialDelayMs: 250, maxDelayMs: 10_000 },
    });
    board = b;
    running.add(b.state$.subscribe((s) => renderBadge(s, transport)));
    running.add(b.events$.subscribe(appendLog));
    running.add(
      b.subscribe({
        // A new board starts with a snapshot: the table reconciles every row with it.
        next: (state) => table.render(state),
        error: (err: unknown) => logLine('log-error', err instanceof Error ? err.message : String(err)),
      }),
    );
  };

  for (const radio of radios) {
    radio.addEventListener('change', () => {
      if (!radio.checked) return;
      const transport = parseTransport(radio.value);
      const url = new URL(location.href);
      url.searchParams.set('transport', transport);
      history.replaceState(history.state, '', url);
      logLine('log-note', `switched to ${TRANSPORT_LABEL[transport]}`);
      start(transport);
    });
  }

  start(parseTransport(params.get('transport')));
  wireForm((patch) => board!.updateTask(patch));
}

main();
