import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import {
  type ConnectionState,
  type ServerEvent,
  TaskstreamError,
  type WebSocketOptions,
  fromWebSocket,
  taskSocket,
} from '../src/taskstream';
import { FakeWebSocket, wsEvent, wsReset } from './fakes';

const WS = FakeWebSocket as unknown as WebSocketOptions['WebSocketCtor'];

beforeEach(() => {
  FakeWebSocket.reset();
  vi.useFakeTimers();
});
afterEach(() => {
  vi.useRealTimers();
});

const updated = (task_id: number | string, version: number, extra: Record<string, unknown> = {}) => ({
  event: 'task_updated',
  task_id,
  version,
  ...extra,
});

/** Subscribes and collects everything: events, the error, states. */
function collect(url: string, options: WebSocketOptions = {}) {
  const events: ServerEvent[] = [];
  const states: ConnectionState[] = [];
  let error: unknown;
  const sub = fromWebSocket(url, {
    WebSocketCtor: WS,
    random: () => 0,
    state: { next: (s) => states.push(s) },
    ...options,
  }).subscribe({ next: (e) => events.push(e), error: (e) => (error = e) });
  return { events, states, sub, error: () => error };
}

describe('fromWebSocket', () => {
  it('is cold: one socket per subscription; unsubscribe closes it', () => {
    const obs = fromWebSocket('ws://h:1/ws', { WebSocketCtor: WS });
    expect(FakeWebSocket.instances).toHaveLength(0);
    const a = obs.subscribe();
    const b = obs.subscribe();
    expect(FakeWebSocket.instances).toHaveLength(2);
    a.unsubscribe();
    expect(FakeWebSocket.instances[0]!.closedByClient).toBe(true);
    expect(FakeWebSocket.instances[1]!.closedByClient).toBe(false);
    b.unsubscribe();
    expect(FakeWebSocket.instances[1]!.closedByClient).toBe(true);
  });

  it('turns http(s) into ws(s) and puts the token in access_token', () => {
    const a = collect('http://h:1/ws', { accessToken: 'tok en' });
    expect(FakeWebSocket.last.url).toBe('ws://h:1/ws?access_token=tok%20en&heartbeat=1');
    const b = collect('https://h/x/ws?y=1');
    expect(FakeWebSocket.last.url).toBe('wss://h/x/ws?y=1&heartbeat=1');
    a.sub.unsubscribe();
    b.sub.unsubscribe();
  });

  it('sends nothing before open, then one subscribe with the filter and the last id', () => {
    const { sub } = collect('ws://h/ws', { taskIds: [101, 'abc'], lastEventId: '1700-3' });
    const ws = FakeWebSocket.last;
    expect(ws.sent).toEqual([]);
    ws.open();
    expect(ws.sent).toEqual([{ type: 'subscribe', request_id: expect.any(String), task_ids: [101, 'abc'], last_event_id: '1700-3' }]);
    sub.unsubscribe();
  });

  it('subscribes live (no last_event_id, no task_ids) without options', () => {
    const { sub } = collect('ws://h/ws');
    FakeWebSocket.last.open();
    expect(FakeWebSocket.last.sent).toEqual([{ type: 'subscribe', request_id: expect.any(String) }]);
    sub.unsubscribe();
  });

  it('delivers events and resets as {id, type, data}, like fromEventSource', () => {
    const { events, sub } = collect('ws://h/ws');
    const ws = FakeWebSocket.last;
    ws.open();
    ws.receive(wsEvent('1', updated(101, 1, { status: 'todo' })));
    ws.receive(wsEvent('2', { event: 'task_deleted', task_id: 101 }));
    ws.receive(wsReset('7'));
    ws.receive({ type: 'something_new', x: 1 }); // unknown types are ignored
    expect(events).toEqual([
      { id: '1', type: 'task_updated', data: { event: 'task_updated', task_id: 101, version: 1, status: 'todo' } },
      { id: '2', type: 'task_deleted', data: { event: 'task_deleted', task_id: 101 } },
      { id: '7', type: 'reset', data: { event: 'reset', last_event_id: '7', reason: 'gone' } },
    ]);
    sub.unsubscribe();
  });

  it('errors with a clear message on a message that is not JSON, and closes', () => {
    const { sub, error, states } = collect('ws://h/ws');
    const ws = FakeWebSocket.last;
    ws.open();
    ws.receive('{not json');
    expect(error()).toBeInstanceOf(TaskstreamError);
    expect((error() as Error).message).toMatch(/unparseable message on ws:\/\/h\/ws: \{not json/);
    expect(ws.closedByClient).toBe(true);
    expect(states.at(-1)).toBe('closed');
    sub.unsubscribe();
  });

  it('reports connecting, open, reconnecting, open, closed', async () => {
    const { states, sub } = collect('ws://h/ws', { backoff: { initialDelayMs: 100 } });
    FakeWebSocket.last.accept();
    FakeWebSocket.last.closeFromServer(1001, 'server shutting down');
    await vi.advanceTimersByTimeAsync(50);
    FakeWebSocket.last.accept();
    sub.unsubscribe();
    expect(states).toEqual(['connecting', 'open', 'reconnecting', 'open', 'closed']);
  });

  for (const [code, why] of [
    [1001, 'server shutting down'],
    [1011, 'no pong to two pings'],
    [1006, 'dropped without a close frame'],
  ] as const) {
    it(`after close ${code} (${why}) reconnects with backoff and resumes from the last id seen`, async () => {
      const { events, sub, error } = collect('ws://h/ws', { lastEventId: '5', taskIds: [1], backoff: { initialDelayMs: 100 } });
      const first = FakeWebSocket.last;
      first.open();
      first.receive(wsEvent('6', updated(1, 1)));
      if (code === 1006) first.fail();
      else first.closeFromServer(code, why);
      await vi.advanceTimersByTimeAsync(49); // random() = 0: half of 100 ms
      expect(FakeWebSocket.instances).toHaveLength(1);
      await vi.advanceTimersByTimeAsync(1);
      expect(FakeWebSocket.instances).toHaveLength(2);
      const second = FakeWebSocket.last;
      expect(second.url).toBe(first.url);
      second.open();
      expect(second.sentOf('subscribe')).toEqual([{ type: 'subscribe', request_id: expect.any(String), task_ids: [1], last_event_id: '6' }]);
      second.receive(wsEvent('7', updated(1, 2)));
      expect(events.map((e) => e.id)).toEqual(['6', '7']);
      expect(error()).toBeUndefined();
      sub.unsubscribe();
    });
  }

  it('resumes after a reset from the reset id', async () => {
    const { sub } = collect('ws://h/ws', { lastEventId: '3' });
    FakeWebSocket.last.open();
    FakeWebSocket.last.receive(wsReset('90'));
    FakeWebSocket.last.closeFromServer(1011);
    await vi.advanceTimersByTimeAsync(1000);
    FakeWebSocket.last.open();
    expect(FakeWebSocket.last.sentOf('subscribe')[0]!.last_event_id).toBe('90');
    sub.unsubscribe();
  });

  it('backs off exponentially with jitter while the server is unreachable, and an open resets it', async () => {
    const { sub } = collect('ws://h/ws', { backoff: { initialDelayMs: 100, maxDelayMs: 1000 } });
    for (const expected of [50, 100, 200, 400, 500, 500]) {
      FakeWebSocket.last.fail();
      const before = FakeWebSocket.instances.length;
      await vi.advanceTimersByTimeAsync(expected - 1);
      expect(FakeWebSocket.instances.length).toBe(before);
      await vi.advanceTimersByTimeAsync(1);
      expect(FakeWebSocket.instances.length).toBe(before + 1);
    }
    FakeWebSocket.last.open();
    FakeWebSocket.last.closeFromServer(1001);
    await vi.advanceTimersByTimeAsync(50);
    expect(FakeWebSocket.instances).toHaveLength(8);
    sub.unsubscribe();
  });

  it('keeps backing off when the server accepts and closes at once with 1013 (too many subscribers)', async () => {
    const { sub, error, states } = collect('ws://h/ws', { backoff: { initialDelayMs: 100 } });
    for (const expected of [50, 100, 200, 400]) {
      FakeWebSocket.last.open();
      FakeWebSocket.last.closeFromServer(1013, 'too many subscribers');
      const before = FakeWebSocket.instances.length;
      await vi.advanceTimersByTimeAsync(expected - 1);
      expect(FakeWebSocket.instances.length).toBe(before);
      await vi.advanceTimersByTimeAsync(1);
      expect(FakeWebSocket.instances.length).toBe(before + 1);
    }
    expect(error()).toBeUndefined();
    expect(states.at(-1)).toBe('reconnecting');
    sub.unsubscribe();
  });

  it('errors, without retrying, on close 1008 (auth failure)', async () => {
    const { sub, error, states } = collect('ws://h/ws');
    FakeWebSocket.last.open();
    FakeWebSocket.last.closeFromServer(1008, 'token expired');
    await vi.advanceTimersByTimeAsync(60_000);
    expect(FakeWebSocket.instances).toHaveLength(1);
    const err = error() as TaskstreamError;
    expect(err).toBeInstanceOf(TaskstreamError);
    expect(err.closeCode).toBe(1008);
    expect(err.message).toBe('WebSocket closed with 1008: token expired');
    expect(states.at(-1)).toBe('closed');
    sub.unsubscribe();
  });

  it('retries after 1011 "client is not reading" (a slow client, not auth)', async () => {
    const { sub, error } = collect('ws://h/ws');
    FakeWebSocket.last.open();
    FakeWebSocket.last.closeFromServer(1011, 'client is not reading');
    await vi.advanceTimersByTimeAsync(500);
    expect(FakeWebSocket.instances).toHaveLength(2);
    expect(error()).toBeUndefined();
    sub.unsubscribe();
  });

  it('errors when the server refuses the subscribe (its request_id), and not on other errors', () => {
    const { sub, error } = collect('ws://h/ws', { taskIds: ['bad id!'] });
    const ws = FakeWebSocket.last;
    ws.open();
    ws.receive({ type: 'error', request_id: null, error: 'message is not valid JSON' }); // not ours
    ws.receive({ type: 'error', request_id: 'other', error: 'no' }); // not ours
    expect(error()).toBeUndefined();
    const { request_id } = ws.sentOf('subscribe')[0]!;
    ws.receive({ type: 'error', request_id, error: 'task_ids: "bad id!": invalid task id' });
    expect((error() as Error).message).toBe('subscribe refused: task_ids: "bad id!": invalid task id');
    expect(ws.closedByClient).toBe(true);
    sub.unsubscribe();
  });

  it('errors at once when the URL cannot be opened', () => {
    class Throwing {
      constructor(url: string) {
        throw new SyntaxError(`invalid URL ${url}`);
      }
    }
    let error: unknown;
    fromWebSocket('nope', { WebSocketCtor: Throwing as never }).subscribe({ error: (e) => (error = e) });
    expect((error as Error).message).toBe('cannot open a WebSocket on nope: invalid URL nope?heartbeat=1');
  });

  it('stops retrying when unsubscribed during the backoff, and ignores the late close of an old socket', async () => {
    const { sub, states } = collect('ws://h/ws', { backoff: { initialDelayMs: 100 } });
    FakeWebSocket.last.open();
    FakeWebSocket.last.closeFromServer(1001);
    sub.unsubscribe();
    await vi.advanceTimersByTimeAsync(10_000);
    expect(FakeWebSocket.instances).toHaveLength(1);
    expect(states.at(-1)).toBe('closed');
  });
});

describe('taskSocket', () => {
  const socket = (options: WebSocketOptions = {}) => taskSocket('ws://h/ws', { WebSocketCtor: WS, random: () => 0, ...options });

  it('shares one socket among events$ subscribers and sends one subscribe', () => {
    const s = socket();
    const a: string[] = [];
    const b: string[] = [];
    const subA = s.events$.subscribe((e) => a.push(e.id));
    const subB = s.events$.subscribe((e) => b.push(e.id));
    expect(FakeWebSocket.instances).toHaveLength(1);
    FakeWebSocket.last.open();
    FakeWebSocket.last.receive(wsEvent('1', updated(1, 1)));
    expect(FakeWebSocket.last.sentOf('subscribe')).toHaveLength(1);
    expect(a).toEqual(['1']);
    expect(b).toEqual(['1']);
    expect(s.state).toBe('open');
    subA.unsubscribe();
    expect(FakeWebSocket.last.closedByClient).toBe(false);
    subB.unsubscribe();
    expect(FakeWebSocket.last.closedByClient).toBe(true);
    expect(s.state).toBe('closed');
  });

  it('updateTask sends update_task with a request_id and resolves on the matching ack only', async () => {
    const s = socket();
    const sub = s.events$.subscribe();
    const ws = FakeWebSocket.last;
    ws.open();
    const one = s.updateTask({ task_id: 101, status: 'done' }, { idempotencyKey: 'k1' });
    const two = s.updateTask({ task_id: 102 });
    const [m1, m2] = ws.sentOf('update_task');
    expect(m1).toEqual({ type: 'update_task', request_id: expect.any(String), task_id: 101, status: 'done', idempotency_key: 'k1' });
    expect(m2).toEqual({ type: 'update_task', request_id: expect.any(String), task_id: 102 });
    expect(m1!.request_id).not.toBe(m2!.request_id);
    let oneDone = false;
    void one.then(() => (oneDone = true));
    // answers come in any order; an ack for an unknown request changes nothing
    ws.receive({ type: 'ack', request_id: 'nobody', event_id: '1', task: { task_id: 9, version: 1 } });
    ws.receive({ type: 'ack', request_id: m2!.request_id, event_id: '8', task: { task_id: 102, version: 4 } });
    await expect(two).resolves.toEqual({ event_id: '8', task: { task_id: 102, version: 4 } });
    expect(oneDone).toBe(false);
    ws.receive({ type: 'ack', request_id: m1!.request_id, event_id: '9', task: { task_id: 101, version: 2, status: 'done' } });
    await expect(one).resolves.toEqual({ event_id: '9', task: { task_id: 101, version: 2, status: 'done' } });
    sub.unsubscribe();
  });

  it('updateTask rejects on the matching error, with the server message', async () => {
    const s = socket();
    const sub = s.events$.subscribe();
    FakeWebSocket.last.open();
    const p = s.updateTask({ task_id: 1, status: '' });
    const { request_id } = FakeWebSocket.last.sentOf('update_task')[0]!;
    FakeWebSocket.last.receive({ type: 'error', request_id, error: 'status must be a string of 1 to 64 characters, got 0' });
    const err = await p.catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TaskstreamError);
    expect((err as Error).message).toBe('update_task refused: status must be a string of 1 to 64 characters, got 0');
    // the events go on
    expect(FakeWebSocket.last.closedByClient).toBe(false);
    sub.unsubscribe();
  });

  it('updateTask before the socket is open waits for the open and is sent then', async () => {
    const s = socket();
    const sub = s.events$.subscribe();
    const p = s.updateTask({ task_id: 5 });
    expect(FakeWebSocket.last.sent).toEqual([]);
    FakeWebSocket.last.open();
    const msg = FakeWebSocket.last.sentOf('update_task')[0]!;
    FakeWebSocket.last.receive({ type: 'ack', request_id: msg.request_id, event_id: '2', task: { task_id: 5, version: 1 } });
    await expect(p).resolves.toMatchObject({ event_id: '2' });
    sub.unsubscribe();
  });

  it('updateTask rejects when the socket closes before the answer, and the events resume', async () => {
    const s = socket({ backoff: { initialDelayMs: 100 } });
    const events: string[] = [];
    const sub = s.events$.subscribe((e) => events.push(e.id));
    FakeWebSocket.last.open();
    FakeWebSocket.last.receive(wsEvent('4', updated(1, 1)));
    const p = s.updateTask({ task_id: 1 });
    FakeWebSocket.last.closeFromServer(1001, 'server shutting down');
    const err = await p.catch((e: unknown) => e);
    expect((err as Error).message).toMatch(/^WebSocket closed with 1001: server shutting down before update_task was answered; it may or may not have been applied/);
    await vi.advanceTimersByTimeAsync(50);
    FakeWebSocket.last.open();
    expect(FakeWebSocket.last.sentOf('subscribe')[0]!.last_event_id).toBe('4');
    expect(FakeWebSocket.last.sentOf('update_task')).toEqual([]); // not resent: the caller decides
    sub.unsubscribe();
  });

  it('updateTask rejects after requestTimeoutMs without an answer', async () => {
    const s = socket({ requestTimeoutMs: 2000 });
    const sub = s.events$.subscribe();
    FakeWebSocket.last.open();
    const p = s.updateTask({ task_id: 1 });
    const caught = p.catch((e: unknown) => e);
    await vi.advanceTimersByTimeAsync(2000);
    expect(((await caught) as Error).message).toBe('no answer to update_task within 2000 ms');
    sub.unsubscribe();
  });

  it('updateTask alone opens the socket for its time, without subscribing', async () => {
    const s = socket();
    const p = s.updateTask({ task_id: 3 });
    expect(FakeWebSocket.instances).toHaveLength(1);
    const ws = FakeWebSocket.last;
    ws.open();
    expect(ws.sentOf('subscribe')).toEqual([]);
    ws.receive({ type: 'ack', request_id: ws.sentOf('update_task')[0]!.request_id, event_id: '1', task: { task_id: 3, version: 1 } });
    await p;
    expect(ws.closedByClient).toBe(true);
    expect(s.state).toBe('closed');
  });

  it('a subscriber joining a socket held open by an update subscribes then', async () => {
    const s = socket({ lastEventId: '10' });
    const p = s.updateTask({ task_id: 3 });
    const ws = FakeWebSocket.last;
    ws.open();
    const sub = s.events$.subscribe();
    expect(ws.sentOf('subscribe')).toEqual([{ type: 'subscribe', request_id: expect.any(String), last_event_id: '10' }]);
    ws.receive({ type: 'ack', request_id: ws.sentOf('update_task')[0]!.request_id, event_id: '11', task: { task_id: 3, version: 1 } });
    await p;
    expect(ws.closedByClient).toBe(false); // the subscriber still holds it
    sub.unsubscribe();
    expect(ws.closedByClient).toBe(true);
  });

  it('a final close rejects waiting updates and errors the events', async () => {
    const s = socket();
    let error: unknown;
    s.events$.subscribe({ error: (e) => (error = e) });
    FakeWebSocket.last.open();
    const p = s.updateTask({ task_id: 1 });
    FakeWebSocket.last.closeFromServer(1008, 'token expired');
    expect(((await p.catch((e: unknown) => e)) as TaskstreamError).closeCode).toBe(1008);
    expect((error as TaskstreamError).closeCode).toBe(1008);
    expect(s.state).toBe('closed');
  });
});
