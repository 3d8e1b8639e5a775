/**
 * The live task board served at `/`: a table of every task, a connection
 * badge, a form that POSTs /update_task, and a log of raw events. All of it
 * runs on one {@link taskBoard} (one EventSource), from the library beside it.
 *
 * The page passes its own `access_token` and `task_id` query parameters on to
 * the library, so `/?task_id=101&access_token=...` works against a server with
 * auth or for one task.
 */
import './board.css';
import {
  type BoardState,
  type ConnectionState,
  type ServerEvent,
  type Task,
  type TaskPatch,
  TaskstreamError,
  taskBoard,
  updateTask,
} from './taskstream';

const LOG_LINES = 200;

const BADGE_LABEL: Record<ConnectionState, string> = {
  connecting: 'connecting',
  open: 'live',
  reconnecting: 'reconnecting',
  closed: 'closed',
};

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
    if (flash) {
      row.classList.remove('flash');
      // Restart the highlight animation on a row that changed again.
      void row.offsetWidth;
      row.classList.add('flash');
    }
  }
}

// ---------------------------------------------------------------------------
// Badge, log, form

function renderBadge(state: ConnectionState): void {
  const badge = byId('conn-badge');
  badge.dataset.state = state;
  badge.title = `connection: ${state}`;
  badge.querySelector('.label')!.textContent = BADGE_LABEL[state];
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

function logError(message: string): void {
  const log = byId<HTMLOListElement>('log');
  const line = el('li', 'log-line log-error', message);
  log.prepend(line);
}

function wireForm(base: string, accessToken: string | undefined): void {
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
    result.textContent = 'sending…';
    updateTask(base, patch, accessToken ? { accessToken } : {})
      .then(
        (res) => {
          result.className = 'ok';
          result.textContent = `accepted: task ${res.task.task_id} v${res.task.version} (event ${res.event_id})`;
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
  const accessToken = params.get('access_token') ?? undefined;
  const taskIds = params.getAll('task_id').flatMap((v) => v.split(',')).filter(Boolean);
  const base = '';

  const board = taskBoard(base, {
    ...(accessToken ? { accessToken } : {}),
    ...(taskIds.length ? { taskIds } : {}),
    backoff: { initialDelayMs: 250, maxDelayMs: 10_000 },
  });
  const table = new TaskTable();

  board.state$.subscribe(renderBadge);
  board.events$.subscribe(appendLog);
  board.subscribe({
    next: (state) => table.render(state),
    error: (err: unknown) => logError(err instanceof Error ? err.message : String(err)),
  });
  wireForm(base, accessToken);
}

main();
