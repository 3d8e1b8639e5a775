import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import {
  type ConnectionState,
  type ServerEvent,
  TaskstreamError,
  backoffDelay,
  connectionState,
  fromEventSource,
  taskKey,
} from '../src/taskstream';
import { FakeEventSource, eventStream, fakeFetch, json, networkError } from './fakes';

const ES = FakeEventSource as unknown as typeof EventSource;

beforeEach(() => {
  FakeEventSource.reset();
  vi.useFakeTimers();
});
afterEach(() => {
  vi.useRealTimers();
});

/** Subscribes and collects everything: events, the error, states. */
function collect(url: string, options: Parameters<typeof fromEventSource>[1] = {}) {
  const events: ServerEvent[] = [];
  const states: ConnectionState[] = [];
  let error: unknown;
  const sub = fromEventSource(url, {
    EventSource: ES as never,
    random: () => 0,
    state: { next: (s) => states.push(s) },
    ...options,
  }).subscribe({ next: (e) => events.push(e), error: (e) => (error = e) });
  return { events, states, sub, error: () => error };
}

describe('fromEventSource', () => {
  it('is cold: one EventSource per subscription, opened on subscribe', () => {
    const obs = fromEventSource('/events', { EventSource: ES as never });
    expect(FakeEventSource.instances).toHaveLength(0);
    const a = obs.subscribe();
    const b = obs.subscribe();
    expect(FakeEventSource.instances).toHaveLength(2);
    a.unsubscribe();
    b.unsubscribe();
  });

  it('closes the EventSource on unsubscribe', () => {
    const { sub } = collect('/events');
    const es = FakeEventSource.last;
    expect(es.closed).toBe(false);
    sub.unsubscribe();
    expect(es.closed).toBe(true);
  });

  it('listens to the named event types and delivers {id, type, data} with data parsed', () => {
    const { events, sub } = collect('/events');
    const es = FakeEventSource.last;
    for (const type of ['task_updated', 'task_deleted', 'reset']) expect(es.listenerCount(type)).toBe(1);
    es.open();
    es.emit('task_updated', '1', { event: 'task_updated', task_id: 101, version: 1, status: 'todo' });
    es.emit('task_deleted', '2', { event: 'task_deleted', task_id: 101 });
    es.emit('reset', '7', { event: 'reset', reason: 'gone', last_event_id: '7' });
    expect(events).toEqual([
      { id: '1', type: 'task_updated', data: { event: 'task_updated', task_id: 101, version: 1, status: 'todo' } },
      { id: '2', type: 'task_deleted', data: { event: 'task_deleted', task_id: 101 } },
      { id: '7', type: 'reset', data: { event: 'reset', reason: 'gone', last_event_id: '7' } },
    ]);
    sub.unsubscribe();
  });

  it('listens to the event types it is given', () => {
    const { events, sub } = collect('/events', { eventTypes: ['custom'] });
    const es = FakeEventSource.last;
    expect(es.listenerCount('task_updated')).toBe(0);
    es.emit('custom', '3', { a: 1 });
    es.emit('message', '4', [1, 2]);
    expect(events).toEqual([
      { id: '3', type: 'custom', data: { a: 1 } },
      { id: '4', type: 'message', data: [1, 2] },
    ]);
    sub.unsubscribe();
  });

  it('puts token, task filter and last id in the query, and passes withCredentials', () => {
    const { sub } = collect('http://h:1/events?x=1', {
      accessToken: 'tok en',
      taskIds: [101, 'abc'],
      lastEventId: '1700-3',
      withCredentials: true,
    });
    const es = FakeEventSource.last;
    expect(es.params.get('x')).toBe('1');
    expect(es.params.get('access_token')).toBe('tok en');
    expect(es.params.getAll('task_id')).toEqual(['101', 'abc']);
    expect(es.params.get('last_event_id')).toBe('1700-3');
    expect(es.init).toEqual({ withCredentials: true });
    sub.unsubscribe();
  });

  it('asks for heartbeats, and adds no other query and no init when there are no options', () => {
    const { sub } = collect('/events');
    expect(FakeEventSource.last.url).toBe('/events?heartbeat=1');
    expect(FakeEventSource.last.init).toBeUndefined();
    sub.unsubscribe();
  });

  it('adds no query at all with heartbeat: false', () => {
    const { sub } = collect('/events', { heartbeat: false });
    expect(FakeEventSource.last.url).toBe('/events');
    expect(FakeEventSource.last.init).toBeUndefined();
    sub.unsubscribe();
  });

  it('errors with a clear message on unparseable data, and closes', () => {
    const { events, sub, error, states } = collect('/events');
    const es = FakeEventSource.last;
    es.open();
    es.emit('task_updated', '9', '{not json');
    expect(events).toEqual([]);
    expect(error()).toBeInstanceOf(TaskstreamError);
    expect(String((error() as Error).message)).toMatch(/unparseable data in task_updated event 9/);
    expect(es.closed).toBe(true);
    expect(states.at(-1)).toBe('closed');
    sub.unsubscribe();
  });

  it('reports reconnecting while the browser retries by itself, and opens again', () => {
    const { states, sub } = collect('/events', { fetch: fakeFetch({}) });
    const es = FakeEventSource.last;
    es.open();
    es.drop();
    expect(states).toEqual(['connecting', 'open', 'reconnecting']);
    expect(FakeEventSource.instances).toHaveLength(1); // the browser's own retry, not ours
    es.open();
    expect(states).toEqual(['connecting', 'open', 'reconnecting', 'open']);
    sub.unsubscribe();
    expect(states.at(-1)).toBe('closed');
  });

  it('recreates the EventSource after a 503 with backoff, honouring Retry-After, from the last id seen', async () => {
    const fetch = fakeFetch({ '/events': () => json(503, { error: 'too many subscribers' }, { 'Retry-After': '2' }) });
    const { events, sub, states } = collect('/events', { fetch, lastEventId: '5', backoff: { initialDelayMs: 100 } });
    const first = FakeEventSource.last;
    first.open();
    first.emit('task_updated', '6', { event: 'task_updated', task_id: 1, version: 1 });
    first.refuse();
    expect(first.closed).toBe(true);
    await vi.advanceTimersByTimeAsync(0);
    expect(fetch).toHaveBeenCalledTimes(1);
    expect(String(fetch.mock.calls[0]![0])).toContain('last_event_id=6');
    await vi.advanceTimersByTimeAsync(1999);
    expect(FakeEventSource.instances).toHaveLength(1); // Retry-After: 2 s beats the 50 ms backoff
    await vi.advanceTimersByTimeAsync(1);
    expect(FakeEventSource.instances).toHaveLength(2);
    const second = FakeEventSource.last;
    expect(second.params.get('last_event_id')).toBe('6');
    second.open();
    second.emit('task_updated', '7', { event: 'task_updated', task_id: 1, version: 2 });
    expect(events.map((e) => e.id)).toEqual(['6', '7']);
    expect(states).toEqual(['connecting', 'open', 'reconnecting', 'open']);
    sub.unsubscribe();
  });

  it('backs off exponentially with jitter while the server stays unreachable, and resets after open', async () => {
    const fetch = fakeFetch({ '/events': networkError });
    const { sub } = collect('/events', { fetch, backoff: { initialDelayMs: 100, maxDelayMs: 1000 } });
    // random() = 0 gives half the nominal delay: 50, 100, 200, 400, 500 (capped), 500
    for (const expected of [50, 100, 200, 400, 500, 500]) {
      FakeEventSource.last.refuse();
      const before = FakeEventSource.instances.length;
      await vi.advanceTimersByTimeAsync(expected - 1);
      expect(FakeEventSource.instances.length).toBe(before);
      await vi.advanceTimersByTimeAsync(1);
      expect(FakeEventSource.instances.length).toBe(before + 1);
    }
    // an open resets the backoff: the next retry is after 50 ms again
    FakeEventSource.last.open();
    FakeEventSource.last.refuse();
    await vi.advanceTimersByTimeAsync(50);
    expect(FakeEventSource.instances).toHaveLength(8);
    sub.unsubscribe();
  });

  it('retries when the probe finds the stream healthy again', async () => {
    const fetch = fakeFetch({ '/events': () => eventStream() });
    const { sub, error } = collect('/events', { fetch, backoff: { initialDelayMs: 10 } });
    FakeEventSource.last.refuse();
    await vi.advanceTimersByTimeAsync(10);
    expect(FakeEventSource.instances).toHaveLength(2);
    expect(error()).toBeUndefined();
    sub.unsubscribe();
  });

  for (const status of [401, 403, 404]) {
    it(`errors, without retrying, when the server answers ${status}`, async () => {
      const fetch = fakeFetch({ '/events': () => json(status, { error: `no: ${status}` }) });
      const { sub, error, states } = collect('/events', { fetch });
      FakeEventSource.last.refuse();
      await vi.advanceTimersByTimeAsync(60_000);
      expect(FakeEventSource.instances).toHaveLength(1);
      const err = error() as TaskstreamError;
      expect(err).toBeInstanceOf(TaskstreamError);
      expect(err.status).toBe(status);
      expect(err.message).toBe(`event stream refused with ${status}: no: ${status}`);
      expect(states.at(-1)).toBe('closed');
      sub.unsubscribe();
    });
  }

  it('errors when the URL answers 200 but is not an event stream', async () => {
    const fetch = fakeFetch({ '/': () => new Response('<html>', { status: 200, headers: { 'Content-Type': 'text/html' } }) });
    const { sub, error } = collect('/', { fetch });
    FakeEventSource.last.refuse();
    await vi.advanceTimersByTimeAsync(0);
    expect((error() as Error).message).toMatch(/not an event stream/);
    sub.unsubscribe();
  });

  it('stops retrying when unsubscribed during the backoff', async () => {
    const fetch = fakeFetch({ '/events': () => json(502, { error: 'bad gateway' }) });
    const { sub, states } = collect('/events', { fetch, backoff: { initialDelayMs: 100 } });
    FakeEventSource.last.refuse();
    await vi.advanceTimersByTimeAsync(0);
    sub.unsubscribe();
    await vi.advanceTimersByTimeAsync(10_000);
    expect(FakeEventSource.instances).toHaveLength(1);
    expect(states.at(-1)).toBe('closed');
  });

  it('errors at once when there is no EventSource', () => {
    const saved = globalThis.EventSource;
    // @ts-expect-error: simulating a runtime without EventSource
    delete globalThis.EventSource;
    let error: unknown;
    fromEventSource('/events').subscribe({ error: (e) => (error = e) });
    expect((error as Error).message).toMatch(/EventSource is not available/);
    if (saved) globalThis.EventSource = saved;
  });
});

describe('connectionState', () => {
  it('replays the current state and emits only changes', () => {
    const conn = connectionState();
    const seen: ConnectionState[] = [];
    conn.state$.subscribe((s) => seen.push(s));
    conn.next('connecting');
    conn.next('open');
    conn.next('open');
    expect(seen).toEqual(['closed', 'connecting', 'open']);
    expect(conn.value).toBe('open');
    const late: ConnectionState[] = [];
    conn.state$.subscribe((s) => late.push(s));
    expect(late).toEqual(['open']);
  });

  it('follows a stream when passed as its state sink', () => {
    const conn = connectionState();
    const sub = fromEventSource('/events', { EventSource: ES as never, state: conn }).subscribe();
    expect(conn.value).toBe('connecting');
    FakeEventSource.last.open();
    expect(conn.value).toBe('open');
    sub.unsubscribe();
    expect(conn.value).toBe('closed');
  });
});

describe('helpers', () => {
  it('taskKey makes 101 and "101" the same task, "0101" another', () => {
    expect(taskKey(101)).toBe(taskKey('101'));
    expect(taskKey('0101')).not.toBe(taskKey(101));
  });

  it('backoffDelay grows, is capped, and jitters within [d/2, d)', () => {
    expect(backoffDelay(0, { initialDelayMs: 100 }, () => 0)).toBe(50);
    expect(backoffDelay(0, { initialDelayMs: 100 }, () => 0.999)).toBe(100);
    expect(backoffDelay(3, { initialDelayMs: 100 }, () => 0)).toBe(400);
    expect(backoffDelay(50, { initialDelayMs: 100, maxDelayMs: 5000 }, () => 0)).toBe(2500);
  });
});
