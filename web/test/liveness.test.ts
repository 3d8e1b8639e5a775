/**
 * The connection-state model, heartbeats and the liveness watchdog, tokens
 * from getToken, close codes, and the compacted catch-up, on both
 * transports and on taskBoard, against the fakes.
 */
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import {
  type BoardState,
  type ConnectionInfo,
  type ConnectionState,
  type TaskEvent,
  TaskstreamError,
  connectionState,
  fromEventSource,
  fromWebSocket,
  taskBoard,
  taskSocket,
} from '../src/taskstream';
import { FakeEventSource, FakeWebSocket, eventStream, fakeFetch, json, wsEvent, wsReset } from './fakes';

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

const updated = (task_id: number | string, version: number, extra: Record<string, unknown> = {}) => ({ event: 'task_updated', task_id, version, ...extra });

/** Every ConnectionInfo reported, and the states alone. */
function infoSink() {
  const infos: ConnectionInfo[] = [];
  return { infos, states: () => infos.map((i) => i.state), sink: { next: () => {}, info: (i: ConnectionInfo) => infos.push(i) } };
}

describe('types', () => {
  it('narrows data on type, with no cast', () => {
    const seen: string[] = [];
    const sub = fromEventSource('/events', { EventSource: ES }).subscribe((ev: TaskEvent) => {
      // These lines compile only because `type` narrows `data` (npm run typecheck).
      if (ev.type === 'task_updated') seen.push(`${ev.data.task_id} v${ev.data.version} ${ev.data.status ?? ''}`);
      else if (ev.type === 'task_deleted') seen.push(`deleted ${ev.data.task_id}`);
      else seen.push(`reset: ${ev.data.reason}`);
    });
    const es = FakeEventSource.last;
    es.open();
    es.emit('task_updated', '1', updated(7, 2, { status: 'done' }));
    es.emit('task_deleted', '2', { event: 'task_deleted', task_id: 7 });
    es.emit('reset', '2', { event: 'reset', reason: 'gone', last_event_id: '2' });
    expect(seen).toEqual(['7 v2 done', 'deleted 7', 'reset: gone']);
    sub.unsubscribe();
  });
});

describe('SSE heartbeats and liveness', () => {
  it('asks for heartbeats and does not deliver them as events', () => {
    const events: TaskEvent[] = [];
    const sub = fromEventSource('/events', { EventSource: ES }).subscribe((e) => events.push(e));
    const es = FakeEventSource.last;
    expect(es.params.get('heartbeat')).toBe('1');
    expect(es.listenerCount('heartbeat')).toBe(1);
    es.open();
    es.heartbeat(1000);
    expect(events).toEqual([]);
    sub.unsubscribe();
  });

  it('reports a silent stream after 2.5 x keep-alive and reopens it at once from the last id', async () => {
    const { infos, states, sink } = infoSink();
    const sub = fromEventSource('/events', { EventSource: ES, state: sink, random: () => 0 }).subscribe();
    const first = FakeEventSource.last;
    first.open();
    first.heartbeat(1000);
    first.emit('task_updated', '41', updated(1, 1));
    await vi.advanceTimersByTimeAsync(2000);
    first.heartbeat(1000, '41'); // any frame is a sign of life
    await vi.advanceTimersByTimeAsync(2400);
    expect(FakeEventSource.instances).toHaveLength(1);
    expect(states().at(-1)).toBe('open');
    await vi.advanceTimersByTimeAsync(100); // 2500 ms of silence
    expect(first.closed).toBe(true);
    const lost = infos.find((i) => i.state === 'reconnecting')!;
    expect(lost.reason).toBe('no data for 2500 ms');
    await vi.advanceTimersByTimeAsync(1);
    expect(FakeEventSource.instances).toHaveLength(2);
    expect(FakeEventSource.last.params.get('last_event_id')).toBe('41');
    FakeEventSource.last.open();
    expect(infos.at(-1)).toMatchObject({ state: 'open', recovered: true, compacted: false, attempt: 0 });
    sub.unsubscribe();
    expect(states().at(-1)).toBe('closed');
  });

  it('without a heartbeat from the server (an older one) never declares silence', async () => {
    const { states, sink } = infoSink();
    const sub = fromEventSource('/events', { EventSource: ES, state: sink }).subscribe();
    FakeEventSource.last.open();
    await vi.advanceTimersByTimeAsync(600_000);
    expect(FakeEventSource.instances).toHaveLength(1);
    expect(states()).toEqual(['connecting', 'open']);
    sub.unsubscribe();
  });

  it('retries a connection attempt that hangs, with backoff', async () => {
    const { infos, sink } = infoSink();
    const sub = fromEventSource('/events', { EventSource: ES, state: sink, random: () => 0, backoff: { initialDelayMs: 400 } }).subscribe();
    FakeEventSource.last.open();
    FakeEventSource.last.heartbeat(1000);
    await vi.advanceTimersByTimeAsync(2501); // silent: reopened at once
    expect(FakeEventSource.instances).toHaveLength(2);
    await vi.advanceTimersByTimeAsync(2500); // the reopen hangs too: now it backs off
    expect(FakeEventSource.instances[1]!.closed).toBe(true);
    const retry = infos.at(-1)!;
    expect(retry).toMatchObject({ state: 'reconnecting', reason: 'no data for 2500 ms', attempt: 2 });
    expect(retry.nextRetryAt).toBe(Date.now() + 400);
    await vi.advanceTimersByTimeAsync(400);
    expect(FakeEventSource.instances).toHaveLength(3);
    sub.unsubscribe();
  });

  it('reports a resume as recovered, a compacted catch-up as compacted, and a reset as not recovered', () => {
    const { infos, sink } = infoSink();
    const events: TaskEvent[] = [];
    const sub = fromEventSource('/events', { EventSource: ES, state: sink, lastEventId: '40' }).subscribe((e) => events.push(e));
    const es = FakeEventSource.last;
    es.open();
    expect(infos.at(-1)).toMatchObject({ state: 'open', recovered: false });
    es.emit('task_updated', '41', updated(1, 1));
    es.drop(); // the browser reconnects by itself with Last-Event-ID
    expect(infos.at(-1)).toMatchObject({ state: 'reconnecting', reason: 'connection lost' });
    es.open();
    expect(infos.at(-1)).toMatchObject({ state: 'open', recovered: true, compacted: false });
    es.emit('compacted', '41', { event: 'compacted', since: '41', tasks: 1 });
    expect(infos.at(-1)).toMatchObject({ state: 'open', recovered: true, compacted: true });
    es.emit('task_updated', '57', updated(1, 5));
    expect(events.map((e) => e.id)).toEqual(['41', '57']); // the compacted frame is not an event
    es.drop();
    es.open();
    es.emit('reset', '57', { event: 'reset', reason: 'gone', last_event_id: '57' });
    expect(infos.at(-1)).toMatchObject({ state: 'open', recovered: false, compacted: false, reason: 'reset: gone' });
    sub.unsubscribe();
  });
});

describe('SSE tokens from getToken', () => {
  it('asks before every connection, reconnects itself with the fresh token, and retries a refusal once', async () => {
    let n = 0;
    const getToken = vi.fn(async () => `t${++n}`);
    const fetch = fakeFetch({ '/events': [() => json(401, { error: 'the token has expired' }), () => json(401, { error: 'the token has expired' })] });
    const { infos, sink } = infoSink();
    let error: unknown;
    const sub = fromEventSource('/events', { EventSource: ES, fetch, getToken, state: sink, random: () => 0 }).subscribe({ error: (e) => (error = e) });
    await vi.advanceTimersByTimeAsync(0);
    expect(FakeEventSource.last.params.get('access_token')).toBe('t1');
    FakeEventSource.last.open();
    FakeEventSource.last.emit('task_updated', '5', updated(1, 1));
    // The server ended the stream (the token expired): not the browser's reconnect, ours.
    FakeEventSource.last.drop();
    expect(FakeEventSource.last.closed).toBe(true);
    await vi.advanceTimersByTimeAsync(500);
    expect(FakeEventSource.instances).toHaveLength(2);
    expect(FakeEventSource.last.params.get('access_token')).toBe('t2');
    expect(FakeEventSource.last.params.get('last_event_id')).toBe('5');
    // Refused with 401: one more token, one more try at once.
    FakeEventSource.last.refuse();
    await vi.advanceTimersByTimeAsync(0);
    expect(infos.some((i) => i.state === 'reconnecting' && i.code === 401)).toBe(true);
    expect(FakeEventSource.instances).toHaveLength(3);
    expect(FakeEventSource.last.params.get('access_token')).toBe('t3');
    // Refused again: final, with the status.
    FakeEventSource.last.refuse();
    await vi.advanceTimersByTimeAsync(0);
    expect(error).toBeInstanceOf(TaskstreamError);
    expect((error as TaskstreamError).status).toBe(401);
    expect(infos.at(-1)).toMatchObject({ state: 'closed', code: 401, error });
    expect(getToken).toHaveBeenCalledTimes(3);
    sub.unsubscribe();
  });

  it('fails the stream when getToken rejects (a signed-out user)', async () => {
    let error: unknown;
    fromEventSource('/events', { EventSource: ES, getToken: () => Promise.reject(new Error('signed out')) }).subscribe({ error: (e) => (error = e) });
    await vi.advanceTimersByTimeAsync(0);
    expect(FakeEventSource.instances).toHaveLength(0);
    expect((error as Error).message).toBe('getToken failed: signed out');
  });

  it('reports attempt and next retry time on a refused connection', async () => {
    const fetch = fakeFetch({ '/events': () => json(503, { error: 'full' }, { 'Retry-After': '2' }) });
    const { infos, sink } = infoSink();
    const sub = fromEventSource('/events', { EventSource: ES, fetch, state: sink, random: () => 0 }).subscribe();
    FakeEventSource.last.refuse();
    await vi.advanceTimersByTimeAsync(0);
    expect(infos.at(-1)).toMatchObject({ state: 'reconnecting', reason: '503: full', code: 503, attempt: 1, nextRetryAt: Date.now() + 2000 });
    sub.unsubscribe();
  });
});

describe('ready()', () => {
  it('resolves on open, and rejects when the stream fails for good', async () => {
    const conn = connectionState();
    const sub = fromEventSource('/events', { EventSource: ES, state: conn }).subscribe();
    let opened = false;
    void conn.ready().then(() => (opened = true));
    await vi.advanceTimersByTimeAsync(0);
    expect(opened).toBe(false);
    FakeEventSource.last.open();
    await vi.advanceTimersByTimeAsync(0);
    expect(opened).toBe(true);
    await expect(conn.ready()).resolves.toBeUndefined();
    sub.unsubscribe();

    const fetch = fakeFetch({ '/events': () => json(403, { error: 'not allowed' }) });
    const conn2 = connectionState();
    fromEventSource('/events', { EventSource: ES, fetch, state: conn2 }).subscribe({ error: () => {} });
    const ready = conn2.ready();
    FakeEventSource.last.refuse();
    await expect(ready).rejects.toMatchObject({ status: 403 });
    const never = connectionState().ready(100);
    vi.advanceTimersByTime(100);
    await expect(never).rejects.toThrow('not open within 100 ms');
  });
});

describe('WebSocket state, close codes and liveness', () => {
  function collect(options: Parameters<typeof fromWebSocket>[1] = {}) {
    const { infos, states, sink } = infoSink();
    const events: TaskEvent[] = [];
    let error: unknown;
    const sub = fromWebSocket('ws://h/ws', { WebSocketCtor: WS, random: () => 0, state: sink, ...options }).subscribe({
      next: (e) => events.push(e),
      error: (e) => (error = e),
    });
    return { infos, states, events, sub, error: () => error };
  }

  it('never shows open for a socket the server upgrades only to close with 1008', () => {
    const { states, error, sub } = collect();
    FakeWebSocket.last.open();
    FakeWebSocket.last.closeFromServer(1008, 'token expired');
    expect(states()).toEqual(['connecting', 'closed']);
    expect((error() as TaskstreamError).closeCode).toBe(1008);
    sub.unsubscribe();
  });

  it('shows open after the grace when a server sends no heartbeat', async () => {
    const { states, sub } = collect();
    FakeWebSocket.last.open();
    await vi.advanceTimersByTimeAsync(999);
    expect(states()).toEqual(['connecting']);
    await vi.advanceTimersByTimeAsync(1);
    expect(states()).toEqual(['connecting', 'open']);
    sub.unsubscribe();
  });

  it('reconnects at once on 1012 (resync) with the last id, with backoff on 1001, and retries 1009 and 1013', async () => {
    const { infos, sub } = collect({ backoff: { initialDelayMs: 400 } });
    FakeWebSocket.last.accept();
    FakeWebSocket.last.receive(wsEvent('9', updated(1, 1)));
    FakeWebSocket.last.closeFromServer(1012, 'resync');
    expect(infos.at(-1)).toMatchObject({ state: 'reconnecting', code: 1012, reason: 'WebSocket closed with 1012: resync', nextRetryAt: Date.now() });
    await vi.advanceTimersByTimeAsync(0);
    expect(FakeWebSocket.instances).toHaveLength(2);
    FakeWebSocket.last.accept();
    expect(FakeWebSocket.last.sentOf('subscribe')[0]).toMatchObject({ last_event_id: '9' });
    expect(infos.at(-1)).toMatchObject({ state: 'open', recovered: true });
    for (const code of [1001, 1009, 1013]) {
      const before = FakeWebSocket.instances.length;
      FakeWebSocket.last.closeFromServer(code, 'x');
      expect(infos.at(-1)).toMatchObject({ state: 'reconnecting', code });
      await vi.advanceTimersByTimeAsync(0);
      expect(FakeWebSocket.instances).toHaveLength(before); // not at once
      await vi.advanceTimersByTimeAsync(800);
      expect(FakeWebSocket.instances).toHaveLength(before + 1);
      FakeWebSocket.last.accept();
      expect(FakeWebSocket.last.sentOf('subscribe')[0]).toMatchObject({ last_event_id: '9' });
    }
    sub.unsubscribe();
  });

  it('closes a silent socket after 2.5 x keep-alive and resumes from the last id', async () => {
    const { infos, sub } = collect();
    const first = FakeWebSocket.last;
    first.accept(2000);
    first.receive(wsEvent('12', updated(1, 1)));
    await vi.advanceTimersByTimeAsync(4999);
    expect(first.closedByClient).toBe(false);
    await vi.advanceTimersByTimeAsync(1);
    expect(first.closedByClient).toBe(true);
    expect(infos.find((i) => i.state === 'reconnecting')).toMatchObject({ reason: 'no data for 5000 ms' });
    await vi.advanceTimersByTimeAsync(1);
    expect(FakeWebSocket.instances).toHaveLength(2);
    FakeWebSocket.last.accept(2000);
    expect(FakeWebSocket.last.sentOf('subscribe')[0]).toMatchObject({ last_event_id: '12' });
    expect(FakeWebSocket.last.params.get('heartbeat')).toBe('1');
    sub.unsubscribe();
  });

  it('with getToken, a 1008 asks for a fresh token and tries once more; a second 1008 is final', async () => {
    let n = 0;
    const getToken = vi.fn(() => `t${++n}`);
    const { error, infos, sub } = collect({ getToken });
    await vi.advanceTimersByTimeAsync(0);
    expect(FakeWebSocket.last.params.get('access_token')).toBe('t1');
    FakeWebSocket.last.accept();
    FakeWebSocket.last.receive(wsEvent('3', updated(1, 1)));
    FakeWebSocket.last.closeFromServer(1008, 'token expired');
    await vi.advanceTimersByTimeAsync(0);
    expect(FakeWebSocket.instances).toHaveLength(2);
    expect(FakeWebSocket.last.params.get('access_token')).toBe('t2');
    FakeWebSocket.last.accept();
    expect(FakeWebSocket.last.sentOf('subscribe')[0]).toMatchObject({ last_event_id: '3' });
    FakeWebSocket.last.receive(wsEvent('4', updated(1, 2)));
    // A later expiry gets its fresh token too: the budget came back with the event.
    FakeWebSocket.last.closeFromServer(1008, 'token expired');
    await vi.advanceTimersByTimeAsync(0);
    expect(FakeWebSocket.last.params.get('access_token')).toBe('t3');
    FakeWebSocket.last.open();
    FakeWebSocket.last.closeFromServer(1008, 'token expired');
    await vi.advanceTimersByTimeAsync(0);
    expect(error()).toBeInstanceOf(TaskstreamError);
    expect((error() as TaskstreamError).closeCode).toBe(1008);
    expect(infos.at(-1)).toMatchObject({ state: 'closed', code: 1008 });
    expect(getToken).toHaveBeenCalledTimes(3);
    sub.unsubscribe();
  });

  it('reports a compacted catch-up, and delivers the events after it', async () => {
    const { infos, events, sub } = collect();
    FakeWebSocket.last.accept();
    FakeWebSocket.last.receive(wsEvent('3', updated(1, 1)));
    FakeWebSocket.last.closeFromServer(1012, 'resync');
    await vi.advanceTimersByTimeAsync(0);
    const ws = FakeWebSocket.last;
    ws.accept();
    ws.receive({ type: 'compacted', since: '3', tasks: 1 });
    expect(infos.at(-1)).toMatchObject({ state: 'open', recovered: true, compacted: true });
    ws.receive(wsEvent('9', updated(1, 4)));
    expect(events.map((e) => e.id)).toEqual(['3', '9']);
    ws.receive(wsReset('9'));
    expect(infos.at(-1)).toMatchObject({ state: 'open', recovered: false, compacted: false });
    sub.unsubscribe();
  });

  it('taskSocket.ready() waits for the first message', async () => {
    const socket = taskSocket('ws://h/ws', { WebSocketCtor: WS });
    const sub = socket.events$.subscribe();
    let ready = false;
    void socket.ready().then(() => (ready = true));
    FakeWebSocket.last.open();
    await vi.advanceTimersByTimeAsync(0);
    expect(ready).toBe(false);
    FakeWebSocket.last.receive({ type: 'heartbeat', keep_alive_ms: 1000 });
    await vi.advanceTimersByTimeAsync(0);
    expect(ready).toBe(true);
    sub.unsubscribe();
  });
});

describe('taskBoard: compacted catch-up, tokens, info', () => {
  for (const transport of ['sse', 'websocket'] as const) {
    it(`applies a compacted catch-up without reloading GET /tasks (${transport}); a reset still reloads`, async () => {
      const fetch = fakeFetch({
        '/tasks': [
          () => json(200, { last_event_id: '10', tasks: [{ task_id: 1, version: 1 }, { task_id: 2, version: 1 }, { task_id: 3, version: 1 }] }),
          () => json(200, { last_event_id: '30', tasks: [{ task_id: 1, version: 9 }] }),
        ],
      });
      const board = taskBoard('http://h', { transport, EventSource: ES, WebSocketCtor: WS, fetch, random: () => 0 });
      const states: BoardState[] = [];
      const infos: ConnectionInfo[] = [];
      board.info$.subscribe((i) => infos.push(i));
      const sub = board.subscribe((s) => states.push(s));
      await vi.advanceTimersByTimeAsync(0);
      const view = () => Object.fromEntries([...states.at(-1)!.tasks].map(([k, t]) => [k, t.version]));
      // Connection lost, then resumed from id 10 with a compacted catch-up:
      // only the latest event of each task changed since, then live.
      if (transport === 'sse') {
        const es = FakeEventSource.last;
        es.open();
        es.drop();
        es.open();
        es.emit('compacted', '10', { event: 'compacted', since: '10', tasks: 2 });
        es.emit('task_deleted', '14', { event: 'task_deleted', task_id: 2 });
        es.emit('task_updated', '17', updated(1, 4));
        es.emit('task_updated', '18', updated(3, 2));
      } else {
        FakeWebSocket.last.accept();
        FakeWebSocket.last.closeFromServer(1012, 'resync');
        await vi.advanceTimersByTimeAsync(0);
        const ws = FakeWebSocket.last;
        ws.accept();
        expect(ws.sentOf('subscribe')[0]).toMatchObject({ last_event_id: '10' });
        ws.receive({ type: 'compacted', since: '10', tasks: 2 });
        ws.receive(wsEvent('14', { event: 'task_deleted', task_id: 2 }));
        ws.receive(wsEvent('17', updated(1, 4)));
        ws.receive(wsEvent('18', updated(3, 2)));
      }
      expect(view()).toEqual({ '1': 4, '3': 2 });
      expect(states.at(-1)!.lastEventId).toBe('18');
      expect(fetch.mock.calls.filter(([u]) => String(u).endsWith('/tasks'))).toHaveLength(1);
      expect(states.filter((s) => s.change.kind === 'snapshot')).toHaveLength(1);
      expect(infos.at(-1)).toMatchObject({ state: 'open', recovered: true, compacted: true });
      // A reset still reloads the snapshot.
      if (transport === 'sse') FakeEventSource.last.emit('reset', '18', { event: 'reset', reason: 'gone', last_event_id: '18' });
      else FakeWebSocket.last.receive(wsReset('18'));
      expect(infos.at(-1)).toMatchObject({ state: 'reconnecting', reason: 'reset: gone' });
      await vi.advanceTimersByTimeAsync(0);
      expect(view()).toEqual({ '1': 9 });
      expect(fetch.mock.calls.filter(([u]) => String(u).endsWith('/tasks'))).toHaveLength(2);
      sub.unsubscribe();
    });
  }

  it('takes a fresh token from getToken for GET /tasks, the stream and POST', async () => {
    let n = 0;
    const fetch = fakeFetch({
      '/tasks': () => json(200, { last_event_id: '1', tasks: [] }),
      '/update_task': () => json(202, { event_id: '2', task: { task_id: 1, version: 1 } }),
      '/events': () => eventStream(),
    });
    const board = taskBoard('', { EventSource: ES, fetch, getToken: async () => `t${++n}` });
    const sub = board.subscribe();
    await vi.advanceTimersByTimeAsync(0);
    const auth = (path: string) => fetch.mock.calls.filter(([u]) => String(u).endsWith(path)).map(([, init]) => new Headers((init as RequestInit).headers).get('authorization'));
    expect(auth('/tasks')).toEqual(['Bearer t1']);
    expect(FakeEventSource.last.params.get('access_token')).toBe('t2');
    await board.updateTask({ task_id: 1 });
    expect(auth('/update_task')).toEqual(['Bearer t3']);
    FakeEventSource.last.open();
    await expect(board.ready()).resolves.toBeUndefined();
    sub.unsubscribe();
  });

  it('board.ready() rejects when the board fails, with the state closed and the error', async () => {
    const fetch = fakeFetch({ '/tasks': () => json(401, { error: 'a token is required' }) });
    const board = taskBoard('', { EventSource: ES, fetch });
    const states: ConnectionState[] = [];
    board.state$.subscribe((s) => states.push(s));
    board.subscribe({ error: () => {} });
    await expect(board.ready()).rejects.toMatchObject({ status: 401 });
    expect(states.at(-1)).toBe('closed');
  });
});
