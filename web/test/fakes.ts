/** Test doubles: an EventSource driven by hand, and a scripted fetch. */
import { vi } from 'vitest';
import type { EventSourceLike } from '../src/taskstream';

type Listener = (ev: MessageEvent) => void;

/** An EventSource whose server side is the test: open(), emit(), drop(), refuse(). */
export class FakeEventSource implements EventSourceLike {
  static readonly CONNECTING = 0;
  static readonly OPEN = 1;
  static readonly CLOSED = 2;
  static instances: FakeEventSource[] = [];

  static reset(): void {
    FakeEventSource.instances = [];
  }

  /** The newest instance, that is the one a test usually drives. */
  static get last(): FakeEventSource {
    const es = FakeEventSource.instances.at(-1);
    if (!es) throw new Error('no EventSource was created');
    return es;
  }

  readyState = FakeEventSource.CONNECTING;
  onopen: ((ev: Event) => void) | null = null;
  onerror: ((ev: Event) => void) | null = null;
  onmessage: ((ev: MessageEvent) => void) | null = null;
  closed = false;
  private readonly listeners = new Map<string, Listener[]>();

  constructor(
    readonly url: string,
    readonly init?: { withCredentials?: boolean },
  ) {
    FakeEventSource.instances.push(this);
  }

  /** The query parameters of the URL it was opened with. */
  get params(): URLSearchParams {
    return new URL(this.url, 'http://test.invalid').searchParams;
  }

  addEventListener(type: string, listener: Listener): void {
    const list = this.listeners.get(type) ?? [];
    list.push(listener);
    this.listeners.set(type, list);
  }

  listenerCount(type: string): number {
    return this.listeners.get(type)?.length ?? 0;
  }

  close(): void {
    this.readyState = FakeEventSource.CLOSED;
    this.closed = true;
  }

  open(): void {
    this.readyState = FakeEventSource.OPEN;
    this.onopen?.(new Event('open'));
  }

  /** Delivers one frame as a browser would: named events to listeners only. */
  emit(type: string, id: string, data: unknown): void {
    const ev = { type, lastEventId: id, data: typeof data === 'string' ? data : JSON.stringify(data) } as MessageEvent;
    if (type === 'message') this.onmessage?.(ev);
    else for (const l of this.listeners.get(type) ?? []) l(ev);
  }

  /** The server's heartbeat (a named event without an id, so lastEventId stays the previous one). */
  heartbeat(keepAliveMs = 1000, lastEventId = ''): void {
    this.emit('heartbeat', lastEventId, { event: 'heartbeat', keep_alive_ms: keepAliveMs });
  }

  /** A network error or a stream the server ended: the browser retries itself. */
  drop(): void {
    this.readyState = FakeEventSource.CONNECTING;
    this.onerror?.(new Event('error'));
  }

  /** A non-200 answer: the browser gives up for good. */
  refuse(): void {
    this.readyState = FakeEventSource.CLOSED;
    this.onerror?.(new Event('error'));
  }
}

export type Route = (url: string, init?: RequestInit) => Response | Promise<Response>;

/** A fetch that answers by route: the first matching prefix of the path wins. */
export function fakeFetch(routes: Record<string, Route | Route[]>) {
  const queues = new Map(Object.entries(routes).map(([k, v]) => [k, Array.isArray(v) ? [...v] : v]));
  return vi.fn(async (input: RequestInfo | URL, init?: RequestInit): Promise<Response> => {
    const url = String(input);
    const path = new URL(url, 'http://test.invalid').pathname;
    for (const [prefix, route] of queues) {
      if (!path.startsWith(prefix)) continue;
      if (Array.isArray(route)) {
        const next = route.length > 1 ? route.shift()! : route[0];
        if (!next) throw new Error(`no answer left for ${url}`);
        return next(url, init);
      }
      return route(url, init);
    }
    throw new TypeError(`fetch failed: no route for ${url}`);
  });
}

export function json(status: number, body: unknown, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), { status, headers: { 'Content-Type': 'application/json', ...headers } });
}

export function eventStream(): Response {
  return new Response('', { status: 200, headers: { 'Content-Type': 'text/event-stream' } });
}

export function networkError(): never {
  throw new TypeError('fetch failed');
}

/**
 * A WebSocket whose server side is the test: open(), receive(), closeFromServer(),
 * fail(). What the client sends is in `sent`, parsed. It is handed to RxJS
 * webSocket() as its WebSocketCtor, so it has the parts RxJS uses.
 */
export class FakeWebSocket {
  static readonly CONNECTING = 0;
  static readonly OPEN = 1;
  static readonly CLOSING = 2;
  static readonly CLOSED = 3;
  static instances: FakeWebSocket[] = [];

  static reset(): void {
    FakeWebSocket.instances = [];
  }

  static get last(): FakeWebSocket {
    const ws = FakeWebSocket.instances.at(-1);
    if (!ws) throw new Error('no WebSocket was created');
    return ws;
  }

  readyState = FakeWebSocket.CONNECTING;
  binaryType = 'blob';
  onopen: ((ev: Event) => void) | null = null;
  onclose: ((ev: CloseEvent) => void) | null = null;
  onerror: ((ev: Event) => void) | null = null;
  onmessage: ((ev: MessageEvent) => void) | null = null;
  /** Every message the client sent, parsed. */
  readonly sent: Array<Record<string, unknown>> = [];
  /** Set when the client closed it. */
  closedByClient = false;

  constructor(
    readonly url: string,
    readonly protocols?: string | string[],
  ) {
    FakeWebSocket.instances.push(this);
  }

  get params(): URLSearchParams {
    return new URL(this.url, 'ws://test.invalid').searchParams;
  }

  /** The messages sent of one type. */
  sentOf(type: string): Array<Record<string, unknown>> {
    return this.sent.filter((m) => m.type === type);
  }

  send(data: string): void {
    if (this.readyState !== FakeWebSocket.OPEN) throw new Error('send on a socket that is not open');
    this.sent.push(JSON.parse(data) as Record<string, unknown>);
  }

  /** The client closes: like a browser, the close event comes later (a microtask here). */
  close(code?: number, reason?: string): void {
    if (this.readyState === FakeWebSocket.CLOSED) return;
    this.closedByClient = true;
    this.readyState = FakeWebSocket.CLOSED;
    queueMicrotask(() => this.onclose?.(closeEvent(code ?? 1005, reason ?? '', true)));
  }

  open(): void {
    this.readyState = FakeWebSocket.OPEN;
    this.onopen?.(new Event('open'));
  }

  /** The upgrade, then the server's first heartbeat, as a server with `?heartbeat=1` sends it. */
  accept(keepAliveMs = 1000): void {
    this.open();
    this.receive({ type: 'heartbeat', keep_alive_ms: keepAliveMs });
  }

  /** One text frame from the server (objects are JSON-encoded). */
  receive(message: unknown): void {
    const data = typeof message === 'string' ? message : JSON.stringify(message);
    this.onmessage?.({ type: 'message', data } as MessageEvent);
  }

  /** The server ends the connection with a close frame: a clean close. */
  closeFromServer(code: number, reason = ''): void {
    this.readyState = FakeWebSocket.CLOSED;
    this.onclose?.(closeEvent(code, reason, true));
  }

  /** A connection that fails (refused, or dropped without a close frame): error, then close 1006. */
  fail(): void {
    this.readyState = FakeWebSocket.CLOSED;
    this.onerror?.(new Event('error'));
    this.onclose?.(closeEvent(1006, '', false));
  }
}

function closeEvent(code: number, reason: string, wasClean: boolean): CloseEvent {
  return { type: 'close', code, reason, wasClean } as CloseEvent;
}

/** Server messages of /ws. */
export const wsEvent = (id: string, data: { event: string } & Record<string, unknown>) => ({ type: 'event', id, event: data.event, data });
export const wsReset = (id: string, reason = 'gone') => ({ type: 'reset', id, event: 'reset', data: { event: 'reset', last_event_id: id, reason } });
