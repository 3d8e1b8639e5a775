import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { type BoardState, type ConnectionState, type ServerEvent, type Task, TaskstreamError, taskBoard, updateTask } from '../src/taskstream';
import { FakeEventSource, FakeWebSocket, fakeFetch, json, networkError, wsEvent, wsReset } from './fakes';

const ES = FakeEventSource as unknown as never;
const WS = FakeWebSocket as unknown as never;

beforeEach(() => {
  FakeEventSource.reset();
  FakeWebSocket.reset();
  vi.useFakeTimers();
});
afterEach(() => {
  vi.useRealTimers();
});

const task = (task_id: number | string, version: number, extra: Partial<Task> = {}): Task => ({ task_id, version, ...extra });
const updated = (t: Task) => ({ event: 'task_updated', ...t });

function watch(board: ReturnType<typeof taskBoard>) {
  const states: BoardState[] = [];
  let error: unknown;
  const sub = board.subscribe({ next: (s) => states.push(s), error: (e) => (error = e) });
  const view = () => Object.fromEntries([...(states.at(-1)?.tasks ?? new Map()).entries()].map(([k, t]) => [k, t.version]));
  return { states, sub, view, error: () => error };
}

describe('taskBoard', () => {
  it('loads the snapshot, then subscribes from its last_event_id', async () => {
    const fetch = fakeFetch({ '/tasks': () => json(200, { last_event_id: '41', tasks: [task(101, 3), task('abc', 1)] }) });
    const { states, sub, view } = watch(taskBoard('http://h:1/', { EventSource: ES, fetch }));
    await vi.advanceTimersByTimeAsync(0);
    expect(String(fetch.mock.calls[0]![0])).toBe('http://h:1/tasks');
    expect(view()).toEqual({ '101': 3, abc: 1 });
    expect(states[0]!.change).toEqual({ kind: 'snapshot' });
    expect(states[0]!.lastEventId).toBe('41');
    const es = FakeEventSource.last;
    expect(es.url.startsWith('http://h:1/events?')).toBe(true);
    expect(es.params.get('last_event_id')).toBe('41');
    sub.unsubscribe();
  });

  it('subscribes from "0" when no event was published yet', async () => {
    const fetch = fakeFetch({ '/tasks': () => json(200, { last_event_id: null, tasks: [] }) });
    const { sub } = watch(taskBoard('', { EventSource: ES, fetch }));
    await vi.advanceTimersByTimeAsync(0);
    expect(FakeEventSource.last.params.get('last_event_id')).toBe('0');
    sub.unsubscribe();
  });

  it('applies events in order, ignores older or equal versions, handles deletes, and keys 101 like "101"', async () => {
    const fetch = fakeFetch({ '/tasks': () => json(200, { last_event_id: '10', tasks: [task(101, 3, { status: 'todo' })] }) });
    const { states, sub, view } = watch(taskBoard('', { EventSource: ES, fetch }));
    await vi.advanceTimersByTimeAsync(0);
    const es = FakeEventSource.last;
    es.open();
    es.emit('task_updated', '11', updated(task(101, 2, { status: 'stale' }))); // older: ignored
    es.emit('task_updated', '12', updated(task('101', 3, { status: 'dup' }))); // same version: ignored
    es.emit('task_updated', '13', updated(task(101, 4, { status: 'doing' })));
    es.emit('task_updated', '14', updated(task('x', 1)));
    es.emit('task_deleted', '15', { event: 'task_deleted', task_id: 'x' });
    es.emit('task_deleted', '16', { event: 'task_deleted', task_id: 'never' }); // unknown: no emission
    expect(view()).toEqual({ '101': 4 });
    expect(states.map((s) => s.change.kind)).toEqual(['snapshot', 'updated', 'updated', 'deleted']);
    const last = states.at(-1)!;
    expect(last.lastEventId).toBe('15'); // 16 changed nothing, so emitted nothing
    expect(states[1]!.tasks.get('101')).toEqual({ task_id: 101, version: 4, status: 'doing' }); // no "event" field
    // every emission is a new Map: consumers can compare by reference
    expect(states[0]!.tasks).not.toBe(states[1]!.tasks);
    sub.unsubscribe();
  });

  it('on reset, reloads the snapshot and resubscribes from the new id', async () => {
    const fetch = fakeFetch({
      '/tasks': [
        () => json(200, { last_event_id: '5', tasks: [task(1, 1), task(2, 1)] }),
        () => json(200, { last_event_id: '90', tasks: [task(1, 7)] }),
      ],
    });
    const board = taskBoard('', { EventSource: ES, fetch });
    const raw: ServerEvent[] = [];
    board.events$.subscribe((e) => raw.push(e));
    const { sub, view } = watch(board);
    await vi.advanceTimersByTimeAsync(0);
    const first = FakeEventSource.last;
    first.open();
    first.emit('reset', '88', { event: 'reset', reason: 'buffer', last_event_id: '88' });
    expect(first.closed).toBe(true);
    await vi.advanceTimersByTimeAsync(0);
    expect(fetch).toHaveBeenCalledTimes(2);
    expect(view()).toEqual({ '1': 7 });
    expect(FakeEventSource.instances).toHaveLength(2);
    expect(FakeEventSource.last.params.get('last_event_id')).toBe('90');
    expect(raw.map((e) => e.type)).toEqual(['reset']);
    sub.unsubscribe();
  });

  it('is shared: many subscribers, one snapshot load and one EventSource; the last unsubscribe closes it', async () => {
    const fetch = fakeFetch({ '/tasks': () => json(200, { last_event_id: '1', tasks: [task(1, 1)] }) });
    const board = taskBoard('', { EventSource: ES, fetch });
    const a = watch(board);
    const b = watch(board);
    await vi.advanceTimersByTimeAsync(0);
    FakeEventSource.last.emit('task_updated', '2', updated(task(1, 2)));
    const c = watch(board); // late: gets the current state at once
    expect(c.view()).toEqual({ '1': 2 });
    expect(fetch).toHaveBeenCalledTimes(1);
    expect(FakeEventSource.instances).toHaveLength(1);
    expect(a.view()).toEqual(b.view());
    a.sub.unsubscribe();
    b.sub.unsubscribe();
    expect(FakeEventSource.last.closed).toBe(false);
    c.sub.unsubscribe();
    expect(FakeEventSource.last.closed).toBe(true);
  });

  it('reports the connection state of its one stream', async () => {
    const fetch = fakeFetch({
      '/tasks': [() => json(200, { last_event_id: '1', tasks: [] }), () => json(200, { last_event_id: '3', tasks: [] })],
    });
    const board = taskBoard('', { EventSource: ES, fetch });
    const seen: ConnectionState[] = [];
    board.state$.subscribe((s) => seen.push(s));
    const { sub } = watch(board);
    await vi.advanceTimersByTimeAsync(0);
    FakeEventSource.last.open();
    FakeEventSource.last.drop();
    FakeEventSource.last.open();
    FakeEventSource.last.emit('reset', '3', { event: 'reset', reason: 'r', last_event_id: '3' });
    await vi.advanceTimersByTimeAsync(0);
    FakeEventSource.last.open();
    sub.unsubscribe();
    // no 'closed' flash while reloading after a reset
    expect(seen).toEqual(['closed', 'connecting', 'open', 'reconnecting', 'open', 'reconnecting', 'open', 'closed']);
  });

  it('retries the snapshot while the server is unreachable', async () => {
    const fetch = fakeFetch({ '/tasks': [networkError, () => json(503, { error: 'busy' }), () => json(200, { last_event_id: '2', tasks: [task(9, 1)] })] });
    const { sub, view } = watch(taskBoard('', { EventSource: ES, fetch, random: () => 0, backoff: { initialDelayMs: 100 } }));
    await vi.advanceTimersByTimeAsync(0);
    expect(FakeEventSource.instances).toHaveLength(0);
    await vi.advanceTimersByTimeAsync(50 + 100);
    expect(fetch).toHaveBeenCalledTimes(3);
    expect(view()).toEqual({ '9': 1 });
    expect(FakeEventSource.instances).toHaveLength(1);
    sub.unsubscribe();
  });

  it('fails with the server message when the snapshot is refused', async () => {
    const fetch = fakeFetch({ '/tasks': () => json(401, { error: 'token expired' }) });
    const board = taskBoard('', { EventSource: ES, fetch });
    const seen: ConnectionState[] = [];
    board.state$.subscribe((s) => seen.push(s));
    const { error } = watch(board);
    await vi.advanceTimersByTimeAsync(0);
    expect(error()).toBeInstanceOf(TaskstreamError);
    expect((error() as Error).message).toBe('GET /tasks answered 401: token expired');
    expect(seen.at(-1)).toBe('closed');
  });

  it('sends the token as Bearer to /tasks and as access_token to /events, and filters tasks', async () => {
    const fetch = fakeFetch({ '/tasks': () => json(200, { last_event_id: '1', tasks: [task(101, 1), task(102, 1)] }) });
    const { sub, view } = watch(taskBoard('', { EventSource: ES, fetch, accessToken: 'T', taskIds: ['101'] }));
    await vi.advanceTimersByTimeAsync(0);
    const init = fetch.mock.calls[0]![1] as RequestInit;
    expect(new Headers(init.headers).get('authorization')).toBe('Bearer T');
    expect(view()).toEqual({ '101': 1 });
    const es = FakeEventSource.last;
    expect(es.params.get('access_token')).toBe('T');
    expect(es.params.getAll('task_id')).toEqual(['101']);
    es.emit('task_updated', '2', updated(task(102, 2))); // not ours: ignored even if sent
    expect(view()).toEqual({ '101': 1 });
    sub.unsubscribe();
  });
});

describe('taskBoard over WebSocket', () => {
  const wsBoard = (fetch: ReturnType<typeof fakeFetch>, extra: Parameters<typeof taskBoard>[1] = {}) =>
    taskBoard('http://h:1', { transport: 'websocket', EventSource: ES, WebSocketCtor: WS, fetch, random: () => 0, ...extra });

  it('loads the snapshot, then opens /ws and subscribes from its last_event_id', async () => {
    const fetch = fakeFetch({ '/tasks': () => json(200, { last_event_id: '41', tasks: [task(101, 3)] }) });
    const board = wsBoard(fetch);
    expect(board.transport).toBe('websocket');
    const { sub, view } = watch(board);
    await vi.advanceTimersByTimeAsync(0);
    expect(view()).toEqual({ '101': 3 });
    expect(FakeEventSource.instances).toHaveLength(0);
    const ws = FakeWebSocket.last;
    expect(ws.url).toBe('ws://h:1/ws?heartbeat=1');
    ws.open();
    expect(ws.sent).toEqual([{ type: 'subscribe', request_id: expect.any(String), last_event_id: '41' }]);
    ws.receive(wsEvent('42', updated(task(101, 4, { status: 'done' }))));
    ws.receive(wsEvent('43', updated(task(101, 4, { status: 'dup' })))); // same version: ignored
    expect(view()).toEqual({ '101': 4 });
    sub.unsubscribe();
    expect(ws.closedByClient).toBe(true);
  });

  it('subscribes from "0" when no event was published yet', async () => {
    const fetch = fakeFetch({ '/tasks': () => json(200, { last_event_id: null, tasks: [] }) });
    const { sub } = watch(wsBoard(fetch));
    await vi.advanceTimersByTimeAsync(0);
    FakeWebSocket.last.open();
    expect(FakeWebSocket.last.sentOf('subscribe')[0]!.last_event_id).toBe('0');
    sub.unsubscribe();
  });

  it('on reset, closes the socket, reloads the snapshot and subscribes on a new socket from the new id', async () => {
    const fetch = fakeFetch({
      '/tasks': [
        () => json(200, { last_event_id: '5', tasks: [task(1, 1), task(2, 1)] }),
        () => json(200, { last_event_id: '90', tasks: [task(1, 7)] }),
      ],
    });
    const board = wsBoard(fetch);
    const raw: ServerEvent[] = [];
    board.events$.subscribe((e) => raw.push(e));
    const { sub, view } = watch(board);
    await vi.advanceTimersByTimeAsync(0);
    const first = FakeWebSocket.last;
    first.open();
    first.receive(wsReset('88'));
    first.receive(wsEvent('89', updated(task(2, 5)))); // after the reset, from the old socket: not applied
    expect(first.closedByClient).toBe(true);
    await vi.advanceTimersByTimeAsync(0);
    expect(view()).toEqual({ '1': 7 });
    expect(FakeWebSocket.instances).toHaveLength(2);
    FakeWebSocket.last.open();
    expect(FakeWebSocket.last.sentOf('subscribe')[0]!.last_event_id).toBe('90');
    expect(raw.map((e) => e.type)).toEqual(['reset']);
    sub.unsubscribe();
  });

  it('resumes on a dropped socket from the last event applied, and reports the state', async () => {
    const fetch = fakeFetch({ '/tasks': () => json(200, { last_event_id: '1', tasks: [] }) });
    const board = wsBoard(fetch, { backoff: { initialDelayMs: 100 } });
    const seen: ConnectionState[] = [];
    board.state$.subscribe((s) => seen.push(s));
    const { sub, view } = watch(board);
    await vi.advanceTimersByTimeAsync(0);
    FakeWebSocket.last.open();
    FakeWebSocket.last.receive(wsEvent('2', updated(task(7, 1))));
    FakeWebSocket.last.closeFromServer(1001, 'server shutting down');
    await vi.advanceTimersByTimeAsync(50);
    FakeWebSocket.last.open();
    expect(FakeWebSocket.last.sentOf('subscribe')[0]!.last_event_id).toBe('2');
    FakeWebSocket.last.receive(wsEvent('3', updated(task(7, 2))));
    expect(view()).toEqual({ '7': 2 });
    expect(fetch).toHaveBeenCalledTimes(1); // no reload needed
    sub.unsubscribe();
    expect(seen).toEqual(['closed', 'connecting', 'open', 'reconnecting', 'open', 'closed']);
  });

  it('is shared: many subscribers, one snapshot load and one socket', async () => {
    const fetch = fakeFetch({ '/tasks': () => json(200, { last_event_id: '1', tasks: [] }) });
    const board = wsBoard(fetch);
    const a = watch(board);
    const b = watch(board);
    await vi.advanceTimersByTimeAsync(0);
    expect(FakeWebSocket.instances).toHaveLength(1);
    expect(fetch).toHaveBeenCalledTimes(1);
    a.sub.unsubscribe();
    b.sub.unsubscribe();
    expect(FakeWebSocket.last.closedByClient).toBe(true);
  });

  it('sends the token as Bearer to /tasks and as access_token to /ws, and the filter as task_ids', async () => {
    const fetch = fakeFetch({ '/tasks': () => json(200, { last_event_id: '1', tasks: [task(101, 1), task(102, 1)] }) });
    const { sub, view } = watch(wsBoard(fetch, { accessToken: 'T', taskIds: ['101'] }));
    await vi.advanceTimersByTimeAsync(0);
    expect(new Headers((fetch.mock.calls[0]![1] as RequestInit).headers).get('authorization')).toBe('Bearer T');
    expect(view()).toEqual({ '101': 1 });
    const ws = FakeWebSocket.last;
    expect(ws.params.get('access_token')).toBe('T');
    ws.open();
    expect(ws.sentOf('subscribe')[0]!.task_ids).toEqual(['101']);
    ws.receive(wsEvent('2', updated(task(102, 2)))); // not ours: ignored even if sent
    expect(view()).toEqual({ '101': 1 });
    sub.unsubscribe();
  });

  it('fails the board on close 1008', async () => {
    const fetch = fakeFetch({ '/tasks': () => json(200, { last_event_id: '1', tasks: [] }) });
    const { error } = watch(wsBoard(fetch));
    await vi.advanceTimersByTimeAsync(0);
    FakeWebSocket.last.open();
    FakeWebSocket.last.closeFromServer(1008, 'token expired');
    expect((error() as TaskstreamError).closeCode).toBe(1008);
  });

  it('updateTask goes over the open socket, and over POST while it is not open', async () => {
    const fetch = fakeFetch({
      '/tasks': () => json(200, { last_event_id: '1', tasks: [] }),
      '/update_task': () => json(202, { event_id: '3', task: task(9, 2) }),
    });
    const board = wsBoard(fetch, { accessToken: 'T' });
    const { sub } = watch(board);
    await vi.advanceTimersByTimeAsync(0);
    // not open yet: POST, with the token
    await expect(board.updateTask({ task_id: 9 })).resolves.toEqual({ event_id: '3', task: task(9, 2), via: 'http' });
    const post = fetch.mock.calls.find(([url]) => String(url).endsWith('/update_task'))!;
    expect(new Headers((post[1] as RequestInit).headers).get('authorization')).toBe('Bearer T');
    const ws = FakeWebSocket.last;
    ws.accept();
    const p = board.updateTask({ task_id: 9, status: 'x' }, { idempotencyKey: 'k' });
    const msg = ws.sentOf('update_task')[0]!;
    expect(msg).toMatchObject({ task_id: 9, status: 'x', idempotency_key: 'k' });
    ws.receive({ type: 'ack', request_id: msg.request_id, event_id: '4', task: task(9, 3) });
    await expect(p).resolves.toEqual({ event_id: '4', task: task(9, 3), via: 'websocket' });
    sub.unsubscribe();
  });
});

describe('taskBoard over SSE', () => {
  it('updateTask POSTs', async () => {
    const fetch = fakeFetch({
      '/tasks': () => json(200, { last_event_id: '1', tasks: [] }),
      '/update_task': () => json(202, { event_id: '3', task: task(9, 2) }),
    });
    const board = taskBoard('', { EventSource: ES, fetch });
    expect(board.transport).toBe('sse');
    const { sub } = watch(board);
    await vi.advanceTimersByTimeAsync(0);
    FakeEventSource.last.open();
    await expect(board.updateTask({ task_id: 9 })).resolves.toMatchObject({ event_id: '3', via: 'http' });
    sub.unsubscribe();
  });
});

describe('updateTask', () => {
  it('POSTs JSON and returns the answer', async () => {
    const fetch = fakeFetch({ '/update_task': () => json(202, { event_id: '3', task: task(101, 2, { status: 'done' }) }) });
    const res = await updateTask('http://h:1', { task_id: 101, status: 'done' }, { fetch, idempotencyKey: 'k1' });
    expect(res.event_id).toBe('3');
    const [url, init] = fetch.mock.calls[0]! as [string, RequestInit];
    expect(url).toBe('http://h:1/update_task');
    expect(init.method).toBe('POST');
    const headers = new Headers(init.headers);
    expect(headers.get('content-type')).toBe('application/json');
    expect(headers.get('idempotency-key')).toBe('k1');
    expect(JSON.parse(init.body as string)).toEqual({ task_id: 101, status: 'done' });
  });

  it("rejects with the server's error message and status", async () => {
    const fetch = fakeFetch({ '/update_task': () => json(400, { error: 'status: must be 1 to 64 characters' }) });
    const err = await updateTask('', { task_id: 1, status: '' }, { fetch }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TaskstreamError);
    expect((err as TaskstreamError).status).toBe(400);
    expect((err as Error).message).toBe('update_task answered 400: status: must be 1 to 64 characters');
  });
});
