/**
 * RxJS client for taskstream: the `/events` Server-Sent Events stream as a
 * cold Observable ({@link fromEventSource}), the same events over the `/ws`
 * WebSocket ({@link fromWebSocket}, and {@link taskSocket} to publish on it
 * too), their connection state for a status badge ({@link connectionState}),
 * the state of every task kept consistent with a snapshot plus the stream on
 * either transport ({@link taskBoard}), and a typed `POST /update_task`
 * ({@link updateTask}).
 *
 * It depends on nothing but RxJS 7 (its `webSocket()` subject for `/ws`) and
 * the browser's `EventSource`, `WebSocket` and `fetch` (all injectable, for
 * tests and for other runtimes).
 *
 * @packageDocumentation
 */
import { BehaviorSubject, Observable, Subject, Subscription, type Subscriber, distinctUntilChanged, map, shareReplay } from 'rxjs';
import { type WebSocketSubject, webSocket } from 'rxjs/webSocket';

// ---------------------------------------------------------------------------
// Types

/** A task as the server stores it (see SPEC.md, "Tasks"). */
export interface Task {
  /** A positive integer or a string of `[A-Za-z0-9_.:-]`; `101` and `"101"` are the same task. */
  task_id: number | string;
  status?: string;
  title?: string;
  assignee?: string | null;
  data?: Record<string, unknown>;
  /** Starts at 1, +1 on every update. */
  version: number;
  /** RFC 3339, UTC. */
  updated_at?: string;
}

/** The fields `POST /update_task` accepts: `task_id` plus any field to replace. */
export interface TaskPatch {
  task_id: number | string;
  status?: string;
  title?: string;
  assignee?: string | null;
  data?: Record<string, unknown>;
}

/** The `data` of a `task_updated` event: the whole task after the change, plus `event`. */
export interface TaskUpdatedData extends Task {
  event: 'task_updated';
}

/** The `data` of a `task_deleted` event. */
export interface TaskDeletedData {
  event: 'task_deleted';
  task_id: number | string;
}

/** The `data` of a `reset` event: the client missed events and must reload `GET /tasks`. */
export interface ResetData {
  event: 'reset';
  reason: string;
  last_event_id: string;
}

/** One event as it came off the stream, for custom event types (see {@link TaskEvent} for the server's own). */
export interface ServerEvent<T = unknown> {
  /** The SSE `id:` field; opaque, never compare it except for equality. */
  id: string;
  /** The SSE `event:` field (`message` for unnamed events). */
  type: string;
  /** The SSE `data:` field, parsed as JSON. */
  data: T;
}

/**
 * Any event the taskstream server sends: checking `type` narrows `data`.
 *
 * @example
 * ```ts
 * if (ev.type === 'task_deleted') console.log(ev.data.task_id); // TaskDeletedData
 * ```
 */
export type TaskEvent =
  | { id: string; type: 'task_updated'; data: TaskUpdatedData }
  | { id: string; type: 'task_deleted'; data: TaskDeletedData }
  | { id: string; type: 'reset'; data: ResetData };

/**
 * The state of a connection, for a status badge:
 * - `connecting`: the first attempt, not open yet;
 * - `open`: the server accepted the stream (on `/ws`: its first message arrived);
 * - `reconnecting`: it was lost, refused or went silent, and is being retried;
 * - `closed`: nobody is subscribed, or the stream failed for good.
 */
export type ConnectionState = 'connecting' | 'open' | 'reconnecting' | 'closed';

/**
 * The connection state with the detail a UI or a log needs, in the spirit of
 * centrifuge-js's `connecting` / `connected` / `disconnected` contexts.
 */
export interface ConnectionInfo {
  readonly state: ConnectionState;
  /** `Date.now()` when this state began (a change of reason or attempt within one state keeps it). */
  readonly since: number;
  /** Why the connection is not open (or closed): the server's close reason, the HTTP answer, `no data for 2500 ms`, ... */
  readonly reason?: string;
  /** The WebSocket close code or HTTP status behind `reason`, when there was one. */
  readonly code?: number;
  /** Failed attempts since the last open; 0 while open and on the first connect. */
  readonly attempt: number;
  /** `Date.now()` of the next attempt, while one is scheduled. */
  readonly nextRetryAt?: number;
  /**
   * While `open`: this connection resumed a previous one of the same
   * subscription from its last event id, and no `reset` came (yet): nothing
   * was missed. `false` for a first connection, and once a `reset` arrived.
   */
  readonly recovered?: boolean;
  /** While `open`: the resume was a compacted catch-up (only the latest event of each task changed meanwhile). */
  readonly compacted?: boolean;
  /** When `closed` for good: the error the stream failed with. */
  readonly error?: TaskstreamError;
}

/**
 * Where state changes are reported: a Subject of states, a
 * {@link ConnectionStateTracker}, or any `{ next }`. With `info`, that is
 * called on every change (of state, reason, attempt, ...) instead of `next`.
 */
export interface ConnectionStateSink {
  next(state: ConnectionState): void;
  info?(info: ConnectionInfo): void;
}

/** Backoff between the reconnects the wrapper makes itself. */
export interface BackoffOptions {
  /** Delay before the first retry, ms. Default 500. */
  initialDelayMs?: number;
  /** Upper bound of the delay, ms. Default 30000. */
  maxDelayMs?: number;
  /** Growth per failed attempt. Default 2. */
  factor?: number;
}

/** Options shared by {@link fromEventSource}, {@link fromWebSocket}, {@link taskSocket} and {@link taskBoard}. */
export interface ConnectionOptions {
  /** A JWT, sent as the `access_token` query parameter on `/events` and `/ws` (neither EventSource nor WebSocket can set headers) and as `Authorization: Bearer` on `fetch`. */
  accessToken?: string;
  /**
   * Called for a token before every connection (the first and each
   * reconnect) and every `GET /tasks`; when the server refuses a token
   * (SSE 401/403, close 1008) it is called once more and the connection
   * retried once. A rejection fails the stream (a signed-out user). Takes
   * precedence over `accessToken`.
   */
  getToken?: () => string | Promise<string>;
  /** Passed to `EventSource` (and `credentials: 'include'` to `fetch`): send cookies cross-origin. */
  withCredentials?: boolean;
  /** Only these tasks' events (the `task_id` query parameter, repeated). */
  taskIds?: ReadonlyArray<number | string>;
  /** Retry policy for reconnects the wrapper makes itself. */
  backoff?: BackoffOptions;
  /**
   * Ask the server for heartbeats (`?heartbeat=1`) and treat a connection
   * that sent nothing for 2.5 x the server's keep-alive as lost: report it
   * and reconnect with the last id. Default true.
   */
  heartbeat?: boolean;
  /** How long the status probe after a failed connection may take, ms. Default 3000. */
  probeTimeoutMs?: number;
  /** The `EventSource` constructor to use. Default `globalThis.EventSource`. */
  EventSource?: EventSourceConstructor;
  /** The `WebSocket` constructor to use (handed to RxJS `webSocket()`). Default `globalThis.WebSocket`. */
  WebSocketCtor?: WebSocketConstructor;
  /** The `fetch` to use. Default `globalThis.fetch`. */
  fetch?: typeof fetch;
  /** Random numbers in [0, 1) for the jitter. Default `Math.random`. */
  random?: () => number;
}

/** Options of {@link fromEventSource}. */
export interface EventSourceOptions extends ConnectionOptions {
  /** Resume after this event id (the `last_event_id` query parameter). */
  lastEventId?: string;
  /** The named event types to listen to. Default `task_updated`, `task_deleted`, `reset`. Unnamed events are always delivered as `message`. */
  eventTypes?: ReadonlyArray<string>;
  /** Told every connection state change of this subscription. */
  state?: ConnectionStateSink;
}

/** The parts of the `EventSource` constructor this library uses. */
export interface EventSourceConstructor {
  new (url: string, init?: { withCredentials?: boolean }): EventSourceLike;
  readonly CLOSED: number;
}

/** The parts of an `EventSource` this library uses. */
export interface EventSourceLike {
  readonly readyState: number;
  onopen: ((this: any, ev: Event) => any) | null;
  onerror: ((this: any, ev: Event) => any) | null;
  onmessage: ((this: any, ev: MessageEvent) => any) | null;
  addEventListener(type: string, listener: (ev: MessageEvent) => void): void;
  close(): void;
}

/** The `WebSocket` constructor, as RxJS `webSocket()` takes it. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocket;

/** The error an Observable of this library fails with, when retrying cannot help. */
export class TaskstreamError extends Error {
  /** The HTTP status that made it final, if one did. */
  readonly status: number | undefined;
  /** The WebSocket close code that made it final, if one did (1008: auth failure). */
  readonly closeCode: number | undefined;
  constructor(message: string, status?: number, closeCode?: number) {
    super(message);
    this.name = 'TaskstreamError';
    this.status = status;
    this.closeCode = closeCode;
  }
}

// ---------------------------------------------------------------------------
// Helpers

/** The key a task is stored under: `101` and `"101"` are the same task. */
export function taskKey(taskId: number | string): string {
  return String(taskId);
}

const DEFAULT_EVENT_TYPES = ['task_updated', 'task_deleted', 'reset'] as const;

/** Adds query parameters to `url` (absolute or relative), keeping those it has. */
function withQuery(url: string, params: ReadonlyArray<[string, string]>): string {
  if (params.length === 0) return url;
  const hashAt = url.indexOf('#');
  const base = hashAt < 0 ? url : url.slice(0, hashAt);
  const hash = hashAt < 0 ? '' : url.slice(hashAt);
  const query = params.map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`).join('&');
  return `${base}${base.includes('?') ? '&' : '?'}${query}${hash}`;
}

function connectionParams(options: ConnectionOptions, token: string | undefined): Array<[string, string]> {
  const params: Array<[string, string]> = [];
  if (token) params.push(['access_token', token]);
  for (const id of options.taskIds ?? []) params.push(['task_id', taskKey(id)]);
  if (options.heartbeat ?? true) params.push(['heartbeat', '1']);
  return params;
}

/** The token for the next connection or request: `getToken()` when given, else `accessToken`. */
async function currentToken(options: ConnectionOptions): Promise<string | undefined> {
  if (!options.getToken) return options.accessToken;
  try {
    return await options.getToken();
  } catch (err) {
    throw new TaskstreamError(`getToken failed: ${err instanceof Error ? err.message : String(err)}`);
  }
}

/** What a connection's own code passes to its {@link Reporter}: everything but `since`. */
type InfoUpdate = Omit<ConnectionInfo, 'since' | 'attempt'> & { attempt?: number };

/** Turns a connection's updates into {@link ConnectionInfo} for its sinks, reporting only changes. */
interface Reporter {
  readonly info: ConnectionInfo | undefined;
  /** Replaces the info (fields not given are dropped), keeping `since` within one state. */
  set(update: InfoUpdate): void;
  /** Changes some fields of the current info. */
  patch(fields: Partial<Omit<ConnectionInfo, 'since' | 'state'>>): void;
}

function reporter(...sinks: Array<ConnectionStateSink | undefined>): Reporter {
  let current: ConnectionInfo | undefined;
  const emit = (next: ConnectionInfo) => {
    const prev = current;
    if (prev && sameInfo(prev, next)) return;
    current = next;
    for (const sink of sinks) {
      if (!sink) continue;
      if (sink.info) sink.info(next);
      else if (prev?.state !== next.state) sink.next(next.state);
    }
  };
  return {
    get info() {
      return current;
    },
    set(update) {
      const since = current && current.state === update.state ? current.since : Date.now();
      emit(stripUndefined({ attempt: 0, ...update, since }));
    },
    patch(fields) {
      if (current) emit(stripUndefined({ ...current, ...fields }));
    },
  };
}

function stripUndefined<T extends object>(o: T): T {
  for (const k of Object.keys(o) as Array<keyof T>) if (o[k] === undefined) delete o[k];
  return o;
}

function sameInfo(a: ConnectionInfo, b: ConnectionInfo): boolean {
  const ka = Object.keys(a) as Array<keyof ConnectionInfo>;
  return ka.length === Object.keys(b).length && ka.every((k) => a[k] === b[k]);
}

/** How many keep-alive periods of silence make a connection count as lost. */
const SILENCE_FACTOR = 2.5;

/**
 * The liveness watchdog of one connection: `alive()` on every frame; once
 * the server said its keep-alive (a heartbeat), silence for 2.5 x that calls
 * `onSilent`. Without heartbeats (an older server, `heartbeat: false`) it
 * never fires.
 */
function watchdog(onSilent: (silentMs: number) => void) {
  let keepAliveMs: number | undefined;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const stop = () => {
    if (timer !== undefined) clearTimeout(timer);
    timer = undefined;
  };
  const arm = () => {
    stop();
    if (keepAliveMs === undefined) return;
    const ms = Math.round(keepAliveMs * SILENCE_FACTOR);
    timer = setTimeout(() => {
      timer = undefined;
      onSilent(ms);
    }, ms);
  };
  return {
    /** A frame arrived (or a connection attempt started): the silence starts again. */
    alive: arm,
    /** A heartbeat told the server's keep-alive period. */
    keepAlive(ms: unknown) {
      if (typeof ms === 'number' && Number.isFinite(ms) && ms > 0) keepAliveMs = ms;
      arm();
    },
    stop,
  };
}

/** The `data` of a `heartbeat` (SSE, `?heartbeat=1`) or the `/ws` heartbeat message. */
interface HeartbeatData {
  keep_alive_ms?: number;
}

/** The `data` of an SSE `compacted` event, or the `/ws` `compacted` message (SPEC, "Resume without reload"). */
interface CompactedData {
  since?: string;
  tasks?: number;
}

/** The `n`th retry delay (n from 0), with full-range jitter in [delay/2, delay). */
export function backoffDelay(attempt: number, backoff: BackoffOptions = {}, random: () => number = Math.random): number {
  const initial = backoff.initialDelayMs ?? 500;
  const max = backoff.maxDelayMs ?? 30_000;
  const factor = backoff.factor ?? 2;
  const delay = Math.min(max, initial * Math.pow(factor, Math.min(attempt, 30)));
  // Jitter spreads the reconnects of many clients after a restart, so they
  // don't all knock at once; never below half the delay, so backoff still grows.
  return Math.round(delay * (0.5 + random() * 0.5));
}

/**
 * Whether a status means "retrying the same request cannot help".
 * 408 and 429 are transient by definition; any other 4xx means the request
 * itself (token, permission, URL) is wrong.
 */
function isFinalStatus(status: number): boolean {
  return status >= 400 && status < 500 && status !== 408 && status !== 429;
}

/** Reads `{"error": "..."}` out of an error answer, or a short text. */
async function errorText(res: Response): Promise<string> {
  try {
    const text = await res.text();
    try {
      const body: unknown = JSON.parse(text);
      if (body && typeof body === 'object' && typeof (body as { error?: unknown }).error === 'string') {
        return (body as { error: string }).error;
      }
    } catch {
      // not JSON: fall through to the raw text
    }
    return text.slice(0, 200) || res.statusText;
  } catch {
    return res.statusText;
  }
}

/** What a probe of a stream URL found. */
type ProbeResult =
  | { kind: 'retry'; minDelayMs: number; why: string; status?: number }
  | { kind: 'final'; error: TaskstreamError };

/**
 * `EventSource` hides the status of a failed connection, so ask again with
 * `fetch` and a short timeout, and drop the body at once (a 200 would be a
 * live stream).
 */
async function probe(url: string, options: ConnectionOptions): Promise<ProbeResult> {
  const doFetch = options.fetch ?? globalThis.fetch;
  if (!doFetch) return { kind: 'retry', minDelayMs: 0, why: 'no fetch to probe with' };
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), options.probeTimeoutMs ?? 3000);
  try {
    const res = await doFetch(url, {
      headers: { Accept: 'text/event-stream' },
      credentials: options.withCredentials ? 'include' : 'same-origin',
      cache: 'no-store',
      signal: controller.signal,
    });
    if (res.ok) {
      const type = res.headers.get('content-type') ?? '';
      controller.abort();
      if (!type.startsWith('text/event-stream')) {
        return { kind: 'final', error: new TaskstreamError(`${url} is not an event stream (Content-Type: ${type || 'none'})`, res.status) };
      }
      return { kind: 'retry', minDelayMs: 0, why: 'the stream answers again' };
    }
    const message = await errorText(res);
    if (isFinalStatus(res.status)) {
      return { kind: 'final', error: new TaskstreamError(`event stream refused with ${res.status}: ${message}`, res.status) };
    }
    // Retry-After (seconds) comes with 503 from --max-subscribers: honour it.
    const retryAfter = Number(res.headers.get('retry-after'));
    const minDelayMs = Number.isFinite(retryAfter) && retryAfter > 0 ? Math.min(retryAfter, 60) * 1000 : 0;
    return { kind: 'retry', minDelayMs, why: `${res.status}: ${message}`, status: res.status };
  } catch (err) {
    // Network error, timeout or CORS: the server may be restarting.
    return { kind: 'retry', minDelayMs: 0, why: err instanceof Error ? err.message : String(err) };
  } finally {
    clearTimeout(timer);
    controller.abort();
  }
}

// ---------------------------------------------------------------------------
// fromEventSource

/**
 * A cold Observable of the events of an SSE endpoint.
 *
 * Each subscription opens one `EventSource` on `url` (plus `access_token`,
 * `task_id`, `heartbeat` and `last_event_id` query parameters from
 * `options`); unsubscribing closes it. It listens to the named event types
 * (`task_updated`, `task_deleted`, `reset` by default — named events never
 * reach `onmessage`), parses each `data` as JSON and delivers
 * `{id, type, data}`, typed as {@link TaskEvent} (pass a type argument for
 * custom `eventTypes`).
 *
 * While the browser reconnects by itself (network errors, the server ending
 * the stream) it sends `Last-Event-ID` and this Observable just reports
 * `reconnecting`. A browser gives up for good on any non-200 answer; then this
 * wrapper probes the URL with `fetch` to learn the status and, unless
 * retrying cannot help, opens a new `EventSource` with jittered exponential
 * backoff and the last id it saw as `last_event_id`. With `getToken`, every
 * reconnect is the wrapper's own, so that it carries a fresh token. With
 * heartbeats (the default) a stream silent for 2.5 x the server's keep-alive
 * is reopened from the last id. It errors with a {@link TaskstreamError} only
 * on 4xx answers (401, 403, 404, ...; not 408 or 429), a 200 that is not an
 * event stream, and unparseable data.
 *
 * @example
 * ```ts
 * fromEventSource('/events', { taskIds: [101] }).subscribe((ev) => {
 *   if (ev.type === 'task_updated') console.log(ev.id, ev.data.status);
 * });
 * ```
 */
export function fromEventSource(url: string, options?: EventSourceOptions): Observable<TaskEvent>;
export function fromEventSource<T>(url: string, options?: EventSourceOptions): Observable<ServerEvent<T>>;
export function fromEventSource<T = unknown>(url: string, options: EventSourceOptions = {}): Observable<ServerEvent<T>> {
  return new Observable<ServerEvent<T>>((subscriber) => {
    const ES = options.EventSource ?? (globalThis.EventSource as unknown as EventSourceConstructor | undefined);
    const conn = reporter(options.state);
    if (!ES) {
      const error = new TaskstreamError('EventSource is not available in this runtime; pass options.EventSource');
      conn.set({ state: 'closed', reason: error.message, error });
      subscriber.error(error);
      return;
    }
    const random = options.random ?? Math.random;
    const heartbeat = options.heartbeat ?? true;
    // The heartbeat and compacted frames are named events too (the server
    // sends them only to a client that asked with ?heartbeat=1).
    const types = [...(options.eventTypes ?? DEFAULT_EVENT_TYPES), ...(heartbeat ? ['heartbeat', 'compacted'] : [])];
    let lastEventId = options.lastEventId;
    let token = options.accessToken;
    let source: EventSourceLike | undefined;
    let attempt = 0;
    let everOpened = false;
    let connects = 0;
    let retryTimer: ReturnType<typeof setTimeout> | undefined;
    let done = false;
    /** A fresh token was already tried after the last refusal: a second refusal is final. */
    let authRetried = false;

    const streamUrl = () => {
      const params = connectionParams(options, token);
      if (lastEventId !== undefined) params.push(['last_event_id', lastEventId]);
      return withQuery(url, params);
    };

    const closeSource = () => {
      if (!source) return;
      source.onopen = source.onerror = source.onmessage = null;
      source.close();
      source = undefined;
    };

    const fail = (error: TaskstreamError) => {
      if (done) return;
      done = true;
      live.stop();
      closeSource();
      conn.set({ state: 'closed', reason: error.message, ...(error.status ? { code: error.status } : {}), error });
      subscriber.error(error);
    };

    /** Schedules the wrapper's own reconnect after `delay`, telling the badge why and when. */
    const retry = (delay: number, reason: string, code?: number) => {
      if (done) return;
      live.stop();
      closeSource();
      conn.set({ state: 'reconnecting', reason, attempt, nextRetryAt: Date.now() + delay, ...(code ? { code } : {}) });
      retryTimer = setTimeout(connect, delay);
    };

    const live = watchdog((silentMs) => {
      // A frozen server, proxy or NAT: the socket stays up but nothing comes.
      // Reopen at once from the last id; a second silence backs off.
      const delay = conn.info?.state === 'open' ? 0 : backoffDelay(attempt, options.backoff, random);
      attempt += 1;
      retry(delay, `no data for ${silentMs} ms`);
    });

    const deliver = (type: string, ev: MessageEvent) => {
      if (done) return;
      live.alive();
      if (type === 'heartbeat' || type === 'compacted') {
        // Control frames without an id: lastEventId is not theirs.
        let data: (HeartbeatData & CompactedData) | undefined;
        try {
          data = JSON.parse(ev.data as string) as HeartbeatData & CompactedData;
        } catch {
          data = undefined;
        }
        if (type === 'heartbeat') {
          live.keepAlive(data?.keep_alive_ms);
          // The server accepted this connection (and token) again.
          authRetried = false;
        } else if (conn.info?.state === 'open') {
          conn.patch({ recovered: true, compacted: true });
        }
        return;
      }
      // The browser keeps lastEventId across events without an id: field.
      const id = ev.lastEventId ?? '';
      if (id) lastEventId = id;
      let data: unknown;
      try {
        data = JSON.parse(ev.data as string);
      } catch {
        fail(new TaskstreamError(`unparseable data in ${type} event ${id || '(no id)'}: ${String(ev.data).slice(0, 100)}`));
        return;
      }
      authRetried = false;
      if (type === 'reset' && conn.info?.state === 'open') {
        const reason = (data as Partial<ResetData> | null)?.reason;
        conn.patch({ recovered: false, compacted: false, ...(typeof reason === 'string' ? { reason: `reset: ${reason}` } : {}) });
      }
      subscriber.next({ id, type, data: data as T });
    };

    const open = () => {
      retryTimer = undefined;
      if (done) return;
      const reason = conn.info?.reason;
      conn.set({ state: connects++ > 0 ? 'reconnecting' : 'connecting', attempt, ...(reason && connects > 1 ? { reason } : {}) });
      const es = new ES(streamUrl(), options.withCredentials ? { withCredentials: true } : undefined);
      source = es;
      // A connection attempt that hangs (a frozen server accepts, then says nothing) is silence too.
      live.alive();
      es.onopen = () => {
        // A reopen after an open of this subscription resumed from its last id.
        const resumed = everOpened;
        attempt = 0;
        everOpened = true;
        live.alive();
        conn.set({ state: 'open', recovered: resumed, compacted: false });
      };
      es.onmessage = (ev) => deliver('message', ev);
      for (const type of types) es.addEventListener(type, (ev) => deliver(type, ev));
      es.onerror = () => {
        if (done || source !== es) return;
        if (es.readyState !== ES.CLOSED) {
          if (options.getToken) {
            // The browser would reconnect with the old token in its URL; do it ourselves.
            retry(backoffDelay(attempt++, options.backoff, random), 'connection lost');
            return;
          }
          // The browser retries by itself, sending Last-Event-ID.
          conn.set({ state: 'reconnecting', reason: 'connection lost', attempt });
          return;
        }
        // The browser gave up (a non-200 answer, or a wrong Content-Type).
        const failedUrl = streamUrl();
        closeSource();
        live.stop();
        conn.set({ state: 'reconnecting', reason: 'refused', attempt });
        void probe(failedUrl, options).then((result) => {
          if (done) return;
          if (result.kind === 'final') {
            const status = result.error.status;
            if (options.getToken && !authRetried && (status === 401 || status === 403)) {
              // An expired (or revoked) token: one more try with a fresh one.
              authRetried = true;
              retry(0, result.error.message, status);
              return;
            }
            fail(result.error);
            return;
          }
          const delay = Math.max(result.minDelayMs, backoffDelay(attempt, options.backoff, random));
          attempt += 1;
          retry(delay, result.why, result.status);
        });
      };
    };

    /** Gets a token (when `getToken` is given) and opens the next `EventSource`. */
    const connect = () => {
      retryTimer = undefined;
      if (!options.getToken) return open();
      void currentToken(options).then(
        (t) => {
          token = t;
          open();
        },
        (err: TaskstreamError) => fail(err),
      );
    };

    connect();

    return () => {
      // After a failure the state stays `closed` with its error.
      const failed = done;
      done = true;
      live.stop();
      if (retryTimer !== undefined) clearTimeout(retryTimer);
      closeSource();
      if (!failed) conn.set({ state: 'closed' });
    };
  });
}

// ---------------------------------------------------------------------------
// connectionState

/** A {@link ConnectionStateSink} that is also an Observable of the state, for a badge. */
export interface ConnectionStateTracker extends ConnectionStateSink {
  /** The current state and every change after it (replays the current one on subscribe). */
  readonly state$: Observable<ConnectionState>;
  /** The current {@link ConnectionInfo} and every change of it: reason, attempt, next retry, recovered. */
  readonly info$: Observable<ConnectionInfo>;
  /** The current state. */
  readonly value: ConnectionState;
  /** The current detail. */
  readonly current: ConnectionInfo;
  /**
   * Resolves once the state is `open` (at once if it is); rejects when the
   * connection fails for good (`closed` with an error), or after `timeoutMs`.
   */
  ready(timeoutMs?: number): Promise<void>;
  info(info: ConnectionInfo): void;
}

/**
 * A connection state as its own Observable: pass it as `options.state` to
 * {@link fromEventSource} or {@link fromWebSocket} and subscribe the badge to
 * `state$` (the four names) or `info$` (with reason, code, attempt, next
 * retry time and `recovered`).
 *
 * @example
 * ```ts
 * const conn = connectionState();
 * conn.info$.subscribe((i) => (badge.textContent = i.reason ? `${i.state}: ${i.reason}` : i.state));
 * fromEventSource('/events', { state: conn }).subscribe(render);
 * await conn.ready();
 * ```
 */
export function connectionState(initial: ConnectionState = 'closed'): ConnectionStateTracker {
  const subject = new BehaviorSubject<ConnectionInfo>({ state: initial, since: Date.now(), attempt: 0 });
  const state$ = subject.pipe(
    map((i) => i.state),
    distinctUntilChanged(),
  );
  return {
    state$,
    info$: subject.asObservable(),
    get value() {
      return subject.value.state;
    },
    get current() {
      return subject.value;
    },
    next(state: ConnectionState) {
      if (state !== subject.value.state) subject.next({ state, since: Date.now(), attempt: 0 });
    },
    info(info: ConnectionInfo) {
      subject.next(info);
    },
    ready(timeoutMs?: number) {
      return new Promise<void>((resolve, reject) => {
        let timer: ReturnType<typeof setTimeout> | undefined;
        // The subscription below may settle synchronously (the current info
        // is replayed): adding it to an already closed Subscription ends it.
        const sub = new Subscription();
        const settle = (fn: () => void) => {
          if (sub.closed) return;
          sub.unsubscribe();
          if (timer !== undefined) clearTimeout(timer);
          fn();
        };
        if (timeoutMs !== undefined) {
          timer = setTimeout(() => settle(() => reject(new TaskstreamError(`not open within ${timeoutMs} ms`))), timeoutMs);
        }
        sub.add(
          subject.subscribe((i) => {
            if (i.state === 'open') settle(resolve);
            else if (i.state === 'closed' && i.error) settle(() => reject(i.error));
          }),
        );
      });
    },
  };
}

// ---------------------------------------------------------------------------
// HTTP

function fetchInit(options: ConnectionOptions, init: RequestInit = {}): RequestInit {
  const headers = new Headers(init.headers);
  if (options.accessToken) headers.set('Authorization', `Bearer ${options.accessToken}`);
  return { ...init, headers, credentials: options.withCredentials ? 'include' : 'same-origin', cache: 'no-store' };
}

function joinUrl(baseUrl: string, path: string): string {
  return baseUrl.replace(/\/+$/, '') + path;
}

/** The answer of `GET /tasks`. */
export interface Snapshot {
  last_event_id: string | null;
  tasks: Task[];
}

/** What a request failure means: retry later, or give up with this error. */
class RetryableError extends Error {}

async function loadSnapshot(baseUrl: string, options: ConnectionOptions): Promise<Snapshot> {
  const doFetch = options.fetch ?? globalThis.fetch;
  // A fresh token for every load (getToken); its failure is final, as for the stream.
  const accessToken = await currentToken(options);
  let res: Response;
  try {
    res = await doFetch(joinUrl(baseUrl, '/tasks'), fetchInit({ ...options, accessToken }));
  } catch (err) {
    throw new RetryableError(`GET /tasks failed: ${err instanceof Error ? err.message : String(err)}`);
  }
  if (!res.ok) {
    const message = `GET /tasks answered ${res.status}: ${await errorText(res)}`;
    if (isFinalStatus(res.status)) throw new TaskstreamError(message, res.status);
    throw new RetryableError(message);
  }
  let body: unknown;
  try {
    body = await res.json();
  } catch {
    throw new TaskstreamError('GET /tasks did not answer JSON');
  }
  const snap = body as Partial<Snapshot> | null;
  if (!snap || !Array.isArray(snap.tasks)) throw new TaskstreamError('GET /tasks answered without a tasks array');
  return { last_event_id: snap.last_event_id ?? null, tasks: snap.tasks };
}

/** The answer of `POST /update_task`. */
export interface UpdateResult {
  event_id: string;
  task: Task;
}

/**
 * `POST /update_task` (`Content-Type: application/json`). Resolves with the
 * server's answer; rejects with a {@link TaskstreamError} carrying the
 * server's `error` message and status.
 */
export async function updateTask(
  baseUrl: string,
  patch: TaskPatch,
  options: Pick<ConnectionOptions, 'accessToken' | 'withCredentials' | 'fetch'> & { idempotencyKey?: string } = {},
): Promise<UpdateResult> {
  const doFetch = options.fetch ?? globalThis.fetch;
  const headers: Record<string, string> = { 'Content-Type': 'application/json' };
  if (options.idempotencyKey) headers['Idempotency-Key'] = options.idempotencyKey;
  const res = await doFetch(
    joinUrl(baseUrl, '/update_task'),
    fetchInit(options, { method: 'POST', headers, body: JSON.stringify(patch) }),
  );
  if (!res.ok) throw new TaskstreamError(`update_task answered ${res.status}: ${await errorText(res)}`, res.status);
  return (await res.json()) as UpdateResult;
}

// ---------------------------------------------------------------------------
// WebSocket: GET /ws

/** Options of {@link fromWebSocket} and {@link taskSocket}. */
export interface WebSocketOptions extends ConnectionOptions {
  /** Resume after this event id (`last_event_id` of the first `subscribe`); without it, live events only. */
  lastEventId?: string;
  /** Told every connection state change of the socket. */
  state?: ConnectionStateSink;
  /** How long {@link TaskSocket.updateTask} waits for its `ack` or `error`, including for the socket to open, ms. Default 10000. */
  requestTimeoutMs?: number;
}

/** A message the server sends on `/ws` (see docs/api.md). */
export type SocketMessage =
  | { type: 'event'; id: string; event: string; data: unknown }
  | { type: 'reset'; id: string; event: 'reset'; data: ResetData }
  | { type: 'ack'; request_id: unknown; event_id: string; task: Task }
  | { type: 'error'; request_id: unknown; error: string }
  | { type: 'heartbeat'; keep_alive_ms: number }
  | { type: 'compacted'; since: string; tasks: number };

/** Options of one {@link TaskSocket.updateTask}. */
export interface SocketUpdateOptions {
  /** Sent as `idempotency_key`: a retry with the same key publishes at most once (shared with the `Idempotency-Key` header). */
  idempotencyKey?: string;
}

/**
 * One `/ws` connection: the events it delivers, its state, and publishing on
 * it. See {@link taskSocket}.
 */
export interface TaskSocket {
  /**
   * The events, as `{id, type, data}` exactly like {@link fromEventSource}
   * delivers them. Subscribing opens the socket if it is not open and sends
   * `subscribe`; all subscribers share the one socket and see the events from
   * the moment they subscribe; the last unsubscribe closes it (unless an
   * update is still waiting for its answer). Errors only when retrying cannot
   * help: close code 1008 (auth; after one retry with a fresh token when
   * `getToken` is given), 1003, 1007, a refused `subscribe`, a message that
   * is not JSON.
   */
  readonly events$: Observable<TaskEvent>;
  /** The connection state (replays the current one). */
  readonly state$: Observable<ConnectionState>;
  /** The connection state with its reason, code, attempt, next retry and `recovered` (replays the current one). */
  readonly info$: Observable<ConnectionInfo>;
  /** The current connection state. */
  readonly state: ConnectionState;
  /** Resolves once the socket is open (see {@link ConnectionStateTracker.ready}). */
  ready(timeoutMs?: number): Promise<void>;
  /**
   * Sends `update_task` with a fresh `request_id` (opening the socket for the
   * time of the request if nobody holds it) and resolves with the matching
   * `ack` (`{event_id, task}`, as `POST /update_task` answers). Rejects with a
   * {@link TaskstreamError} on the matching `error`, when the socket closes
   * before the answer (the update may or may not have been applied: retry
   * with an `idempotencyKey`), or after `requestTimeoutMs`.
   */
  updateTask(patch: TaskPatch, options?: SocketUpdateOptions): Promise<UpdateResult>;
}

/**
 * What the client does on each close code the server uses (docs/events.md):
 * - `final`: reconnecting cannot help. 1008 (policy: a missing, invalid,
 *   expired or forbidden token; one retry with a fresh token when `getToken`
 *   is given), 1003 and 1007 (the server cannot take what this client sends);
 * - `now`: 1012 (the node resynced its feed): reconnect at once with the last id;
 * - `later`: everything else, with backoff: 1001 (shutdown), 1011 (the client
 *   looked unresponsive), 1013 (full; an open does not reset the backoff),
 *   1009 (a message of ours too large: pending updates are rejected), 1006.
 */
function closeAction(code: number): 'final' | 'now' | 'later' {
  if (code === 1008 || code === 1003 || code === 1007) return 'final';
  if (code === 1012) return 'now';
  return 'later';
}

/**
 * How long after the upgrade a socket with heartbeats on counts as open when
 * no message came: a server without heartbeats sends nothing on an idle
 * stream. A server with them sends one at once, so `open` normally waits for
 * that first message, and a socket the server upgrades only to close it with
 * 1008 never shows `open`.
 */
const OPEN_GRACE_MS = 1000;

/** `http(s)://` to `ws(s)://`, a relative URL against the page, plus the token and `heartbeat`. */
function socketUrl(url: string, options: ConnectionOptions, token: string | undefined): string {
  let abs = url;
  const here = (globalThis as { location?: { href?: string } }).location?.href;
  if (!/^[a-z][a-z0-9+.-]*:/i.test(abs) && here) abs = new URL(abs, here).href;
  abs = abs.replace(/^http(s?):/i, 'ws$1:');
  const params: Array<[string, string]> = [];
  if (token) params.push(['access_token', token]);
  if (options.heartbeat ?? true) params.push(['heartbeat', '1']);
  return withQuery(abs, params);
}

function isEventLike(err: unknown): err is Event {
  return typeof err === 'object' && err !== null && typeof (err as { type?: unknown }).type === 'string' && !(err instanceof Error);
}

/**
 * One WebSocket on `url` (`/ws`), built on RxJS `webSocket()`, that
 * reconnects by itself and publishes.
 *
 * - Opens while {@link TaskSocket.events$} has subscribers or an update waits
 *   for its answer; each open sends `{"type":"subscribe"}` (when events are
 *   wanted) with `options.taskIds` as `task_ids` and the last event id seen
 *   (first `options.lastEventId`) as `last_event_id`, so the server replays
 *   what was missed, sends a compacted catch-up, or sends `reset`.
 * - When the socket closes it reconnects by close code (see docs/web.md):
 *   1012 at once, others after a jittered exponential backoff
 *   (`options.backoff`; reset by an open that is not at once closed with
 *   1013). Close codes 1008 (auth), 1003 and 1007, a refused `subscribe` and
 *   a message that is not JSON are final: the events error with a
 *   {@link TaskstreamError}.
 * - With heartbeats (the default, `?heartbeat=1`), a socket that sent
 *   nothing for 2.5 x the server's keep-alive is closed and reopened.
 * - The token (`getToken()` before each connect, or `accessToken`) goes as
 *   the `access_token` query parameter.
 *
 * @example
 * ```ts
 * const socket = taskSocket('/ws', { taskIds: [101] });
 * socket.events$.subscribe(ev => console.log(ev.id, ev.type, ev.data));
 * const { task } = await socket.updateTask({ task_id: 101, status: 'done' });
 * ```
 */
export function taskSocket(url: string, options: WebSocketOptions = {}): TaskSocket {
  const tracker = connectionState('closed');
  const conn = reporter(tracker, options.state);
  const random = options.random ?? Math.random;
  const requestTimeoutMs = options.requestTimeoutMs ?? 10_000;
  const heartbeat = options.heartbeat ?? true;
  const subscribers = new Set<Subscriber<TaskEvent>>();

  /** One connection attempt: one RxJS WebSocketSubject, one socket. */
  interface Attempt {
    subject: WebSocketSubject<unknown> | undefined;
    /** Unset while `subscribe()` runs: RxJS reports a throwing constructor synchronously. */
    sub: Subscription | undefined;
    /** The socket is open (upgraded); requests can be sent. */
    open: boolean;
    /** Reported as `open` to the state: the server said something, or the grace passed. */
    shown: boolean;
    graceTimer: ReturnType<typeof setTimeout> | undefined;
    subscribeId: string | undefined;
  }
  interface Request {
    message: Record<string, unknown>;
    sentOn: Attempt | undefined;
    resolve: (result: UpdateResult) => void;
    reject: (error: TaskstreamError) => void;
    timer: ReturnType<typeof setTimeout>;
  }
  const requests = new Map<string, Request>();

  let lastEventId = options.lastEventId;
  let seq = 0;
  let current: Attempt | undefined;
  let retryTimer: ReturnType<typeof setTimeout> | undefined;
  let failures = 0;
  let everOpened = false;
  let connects = 0;
  let authRetried = false;
  /** Waiting for getToken(): counts as running, so sync() does not connect twice. */
  let pendingToken = false;
  /** Bumped by stop(), so that a token arriving after it opens nothing. */
  let generation = 0;

  const running = () => current !== undefined || retryTimer !== undefined || pendingToken;
  const wanted = () => subscribers.size > 0 || requests.size > 0;

  /** Opens or closes the socket to match whether anybody needs it. */
  const sync = () => {
    if (wanted() && !running()) {
      failures = 0;
      everOpened = false;
      connects = 0;
      connect();
    } else if (!wanted() && running()) {
      stop();
    }
  };

  const endAttempt = (attempt: Attempt | undefined) => {
    if (!attempt) return;
    if (attempt.graceTimer !== undefined) clearTimeout(attempt.graceTimer);
    attempt.sub?.unsubscribe(); // RxJS closes the socket
  };

  const stop = (error?: TaskstreamError) => {
    generation += 1;
    pendingToken = false;
    live.stop();
    if (retryTimer !== undefined) clearTimeout(retryTimer);
    retryTimer = undefined;
    const attempt = current;
    current = undefined;
    endAttempt(attempt);
    conn.set(error ? { state: 'closed', reason: error.message, ...(error.closeCode ? { code: error.closeCode } : {}), error } : { state: 'closed' });
  };

  const settle = (id: string, outcome: { ok: UpdateResult } | { err: TaskstreamError }) => {
    const req = requests.get(id);
    if (!req) return;
    requests.delete(id);
    clearTimeout(req.timer);
    if ('ok' in outcome) req.resolve(outcome.ok);
    else req.reject(outcome.err);
  };

  const send = (attempt: Attempt, message: Record<string, unknown>) => attempt.subject?.next(message);

  const sendSubscribe = (attempt: Attempt) => {
    const id = `s${++seq}`;
    attempt.subscribeId = id;
    const message: Record<string, unknown> = { type: 'subscribe', request_id: id };
    if (options.taskIds?.length) message.task_ids = [...options.taskIds];
    if (lastEventId !== undefined) message.last_event_id = lastEventId;
    send(attempt, message);
  };

  /** Final: every subscriber errors, every waiting update is rejected, the socket closes. */
  const fail = (error: TaskstreamError) => {
    const subs = [...subscribers];
    subscribers.clear();
    for (const id of [...requests.keys()]) settle(id, { err: error });
    stop(error);
    for (const s of subs) s.error(error);
  };

  /** Reports `open` once per attempt: on its first message, or after the grace. */
  const show = (attempt: Attempt) => {
    if (attempt.shown || current !== attempt) return;
    attempt.shown = true;
    if (attempt.graceTimer !== undefined) clearTimeout(attempt.graceTimer);
    attempt.graceTimer = undefined;
    // A reopen after an open of this socket resumed from its last id.
    conn.set({ state: 'open', recovered: everOpened, compacted: false });
    everOpened = true;
  };

  /** Schedules the next connection after `delay`, telling the badge why and when. */
  const reconnect = (delay: number, reason: string, code?: number) => {
    live.stop();
    conn.set({ state: 'reconnecting', reason, attempt: failures, nextRetryAt: Date.now() + delay, ...(code ? { code } : {}) });
    retryTimer = setTimeout(connect, delay);
  };

  const live = watchdog((silentMs) => {
    // A frozen server, proxy or NAT: the socket stays up but nothing comes.
    const attempt = current;
    if (!attempt) return;
    current = undefined;
    endAttempt(attempt);
    for (const [id, req] of [...requests]) {
      if (req.sentOn === attempt) settle(id, { err: new TaskstreamError(`WebSocket silent for ${silentMs} ms before update_task was answered; it may or may not have been applied (retry with an idempotency key)`) });
    }
    if (!wanted()) return stop();
    // Reopen at once from the last id; a socket that never said anything backs off.
    const delay = attempt.shown ? 0 : backoffDelay(failures, options.backoff, random);
    if (!attempt.shown) failures += 1;
    reconnect(delay, `no data for ${silentMs} ms`);
  });

  const onMessage = (attempt: Attempt, msg: SocketMessage) => {
    live.alive();
    show(attempt);
    switch (msg.type) {
      case 'heartbeat':
        live.keepAlive(msg.keep_alive_ms);
        return;
      case 'compacted':
        conn.patch({ recovered: true, compacted: true });
        return;
      case 'event':
      case 'reset': {
        authRetried = false;
        // Events that arrive while nobody listens (a socket kept open for an
        // update) are not ours to skip past: the next subscribe resumes before them.
        if (subscribers.size === 0) return;
        lastEventId = msg.id;
        if (msg.type === 'reset') conn.patch({ recovered: false, compacted: false, reason: `reset: ${msg.data.reason}` });
        const ev = { id: msg.id, type: msg.type === 'reset' ? 'reset' : msg.event, data: msg.data } as TaskEvent;
        for (const s of [...subscribers]) s.next(ev);
        return;
      }
      case 'ack':
        if (typeof msg.request_id === 'string') settle(msg.request_id, { ok: { event_id: msg.event_id, task: msg.task } });
        sync();
        return;
      case 'error':
        if (msg.request_id !== null && msg.request_id === attempt.subscribeId) {
          fail(new TaskstreamError(`subscribe refused: ${msg.error}`));
          return;
        }
        if (typeof msg.request_id === 'string' && requests.has(msg.request_id)) {
          settle(msg.request_id, { err: new TaskstreamError(`update_task refused: ${msg.error}`) });
          sync();
        }
        // An error for no request of ours (request_id null): nothing waits for it.
        return;
      default:
        // A message type this client does not know: newer servers may add some.
        return;
    }
  };

  const onEnd = (attempt: Attempt, err: unknown, close: CloseEvent | undefined) => {
    if (current !== attempt) return;
    current = undefined;
    endAttempt(attempt);
    live.stop();
    const closed = close ? `closed with ${close.code}${close.reason ? `: ${close.reason}` : ''}` : 'failed';
    if (err instanceof TaskstreamError) return fail(err);
    const action = close ? closeAction(close.code) : 'later';
    if (action === 'final') {
      if (close?.code === 1008 && options.getToken && !authRetried && wanted()) {
        // An expired token: one more try with a fresh one from getToken().
        authRetried = true;
        rejectSentOn(attempt, closed);
        reconnect(0, `WebSocket ${closed}`, close.code);
        return;
      }
      return fail(new TaskstreamError(`WebSocket ${closed}`, undefined, close?.code));
    }
    if (!close && err !== undefined && !isEventLike(err)) {
      // The constructor threw (an invalid URL, a blocked port): no retry helps.
      return fail(new TaskstreamError(`cannot open a WebSocket on ${url}: ${err instanceof Error ? err.message : String(err)}`));
    }
    rejectSentOn(attempt, closed);
    if (!wanted()) return stop();
    if (action === 'now') return reconnect(0, `WebSocket ${closed}`, close?.code);
    // An open resets the backoff, unless the server closed it at once for being full.
    if (attempt.open && close?.code !== 1013) failures = 0;
    const delay = backoffDelay(failures, options.backoff, random);
    failures += 1;
    reconnect(delay, close ? `WebSocket ${closed}` : 'WebSocket failed', close?.code);
  };

  const rejectSentOn = (attempt: Attempt, closed: string) => {
    for (const [id, req] of [...requests]) {
      if (req.sentOn === attempt) {
        settle(id, {
          err: new TaskstreamError(`WebSocket ${closed} before update_task was answered; it may or may not have been applied (retry with an idempotency key)`),
        });
      }
    }
  };

  const deserializer = (e: MessageEvent): unknown => {
    let msg: unknown;
    try {
      msg = JSON.parse(e.data as string);
    } catch {
      throw new TaskstreamError(`unparseable message on ${url}: ${String(e.data).slice(0, 100)}`);
    }
    const m = msg as { type?: unknown; id?: unknown } | null;
    if (!m || typeof m !== 'object' || typeof m.type !== 'string' || ((m.type === 'event' || m.type === 'reset') && typeof m.id !== 'string')) {
      throw new TaskstreamError(`unexpected message on ${url}: ${String(e.data).slice(0, 100)}`);
    }
    return msg;
  };

  const open = (token: string | undefined) => {
    const Ctor = options.WebSocketCtor ?? (globalThis.WebSocket as WebSocketConstructor | undefined);
    if (!Ctor) {
      fail(new TaskstreamError('WebSocket is not available in this runtime; pass options.WebSocketCtor'));
      return;
    }
    const reason = conn.info?.reason;
    conn.set({ state: connects++ > 0 ? 'reconnecting' : 'connecting', attempt: failures, ...(reason && connects > 1 ? { reason } : {}) });
    let close: CloseEvent | undefined;
    const attempt: Attempt = { subject: undefined, sub: undefined, open: false, shown: false, graceTimer: undefined, subscribeId: undefined };
    attempt.subject = webSocket<unknown>({
      url: socketUrl(url, options, token),
      WebSocketCtor: Ctor,
      deserializer,
      openObserver: {
        next: () => {
          if (current !== attempt) return;
          attempt.open = true;
          live.alive();
          if (heartbeat) attempt.graceTimer = setTimeout(() => show(attempt), OPEN_GRACE_MS);
          else show(attempt);
          if (subscribers.size > 0) sendSubscribe(attempt);
          for (const req of requests.values()) {
            if (req.sentOn) continue;
            req.sentOn = attempt;
            send(attempt, req.message);
          }
        },
      },
      closeObserver: { next: (ev) => (close = ev) },
    });
    current = attempt;
    // A connection attempt that hangs (a frozen server accepts, then says nothing) is silence too.
    live.alive();
    attempt.sub = attempt.subject.subscribe({
      next: (msg) => {
        if (current === attempt) onMessage(attempt, msg as SocketMessage);
      },
      // RxJS: a clean close completes, an unclean one (or a socket error) errors.
      error: (err: unknown) => onEnd(attempt, err, close),
      complete: () => onEnd(attempt, undefined, close),
    });
  };

  /** Gets a token (when `getToken` is given), then opens the next socket. */
  const connect = () => {
    retryTimer = undefined;
    if (!options.getToken) return open(options.accessToken);
    const gen = generation;
    pendingToken = true;
    void currentToken(options).then(
      (token) => {
        if (gen !== generation) return;
        pendingToken = false;
        if (wanted()) open(token);
        else stop();
      },
      (err: TaskstreamError) => {
        if (gen !== generation) return;
        pendingToken = false;
        fail(err);
      },
    );
  };

  const events$ = new Observable<TaskEvent>((subscriber) => {
    subscribers.add(subscriber);
    sync();
    // Joining a socket that is already open (held by an update): subscribe now.
    if (subscribers.size === 1 && current?.open && current.subscribeId === undefined) sendSubscribe(current);
    return () => {
      subscribers.delete(subscriber);
      // A socket kept open for an update goes on delivering; the next
      // subscriber sends subscribe again, from the last id delivered.
      if (subscribers.size === 0 && current) current.subscribeId = undefined;
      sync();
    };
  });

  const updateTask = (patch: TaskPatch, opts: SocketUpdateOptions = {}) =>
    new Promise<UpdateResult>((resolve, reject) => {
      const id = `u${++seq}`;
      const message: Record<string, unknown> = { ...patch, type: 'update_task', request_id: id };
      if (opts.idempotencyKey) message.idempotency_key = opts.idempotencyKey;
      const timer = setTimeout(() => {
        settle(id, { err: new TaskstreamError(`no answer to update_task within ${requestTimeoutMs} ms`) });
        sync();
      }, requestTimeoutMs);
      const req: Request = { message, sentOn: undefined, resolve, reject, timer };
      requests.set(id, req);
      sync();
      if (current?.open && requests.has(id)) {
        req.sentOn = current;
        send(current, message);
      }
    });

  return {
    events$,
    state$: tracker.state$,
    info$: tracker.info$,
    get state() {
      return tracker.value;
    },
    ready: (timeoutMs?: number) => tracker.ready(timeoutMs),
    updateTask,
  };
}

/**
 * A cold Observable of the events of a `/ws` endpoint, the WebSocket twin of
 * {@link fromEventSource}: the same `{id, type, data}` events (typed as
 * {@link TaskEvent}), the same connection states (`options.state`), the same
 * resume with the last id seen after a reconnect, the same `taskIds` filter,
 * tokens and heartbeats. Each subscription opens its own socket
 * ({@link taskSocket}); unsubscribing closes it.
 *
 * @example
 * ```ts
 * fromWebSocket('/ws', { taskIds: [101], lastEventId: '41' }).subscribe((ev) => {
 *   if (ev.type === 'task_updated') console.log(ev.id, ev.data.status);
 * });
 * ```
 */
export function fromWebSocket(url: string, options?: WebSocketOptions): Observable<TaskEvent>;
export function fromWebSocket<T>(url: string, options?: WebSocketOptions): Observable<ServerEvent<T>>;
export function fromWebSocket(url: string, options: WebSocketOptions = {}): Observable<TaskEvent> {
  return new Observable<TaskEvent>((subscriber) => taskSocket(url, options).events$.subscribe(subscriber));
}

// ---------------------------------------------------------------------------
// taskBoard

/** What changed in the last {@link BoardState} emission. */
export type BoardChange =
  | { kind: 'snapshot' }
  | { kind: 'updated'; key: string; task: Task }
  | { kind: 'deleted'; key: string };

/** The state of all tasks, as {@link taskBoard} emits it. */
export interface BoardState {
  /** Every task, keyed by {@link taskKey}; a new Map on every emission. */
  readonly tasks: ReadonlyMap<string, Task>;
  /** The id of the last event applied (or of the snapshot). */
  readonly lastEventId: string | null;
  /** What this emission changed. */
  readonly change: BoardChange;
}

/** How a {@link taskBoard} receives events: `/events` (Server-Sent Events) or `/ws` (WebSocket). */
export type Transport = 'sse' | 'websocket';

/** Options of {@link taskBoard}. */
export interface BoardOptions extends ConnectionOptions {
  /** `sse` (default): `/events` through {@link fromEventSource}; `websocket`: `/ws` through {@link taskSocket}. */
  transport?: Transport;
  /** For `websocket`: how long an update sent on the socket waits for its answer, ms. Default 10000. */
  requestTimeoutMs?: number;
}

/** The answer of {@link TaskBoard.updateTask}: the server's, plus the way it went. */
export interface BoardUpdateResult extends UpdateResult {
  /** `websocket`: sent as `update_task` on the board's open socket; `http`: `POST /update_task`. */
  via: 'websocket' | 'http';
}

/**
 * The state of all tasks, as a shared Observable, plus the connection state
 * and raw events of the one connection behind it.
 */
export interface TaskBoard extends Observable<BoardState> {
  /** The transport the board's events come over. */
  readonly transport: Transport;
  /** The connection state of the board's stream (`closed` while nobody subscribes). */
  readonly state$: Observable<ConnectionState>;
  /**
   * The same with reason, code, attempt, next retry and `recovered` /
   * `compacted` after a resume; a `reset` shows as `reconnecting` with the
   * reason `reset: ...` while the snapshot reloads.
   */
  readonly info$: Observable<ConnectionInfo>;
  /** Resolves once the board's stream is open (the snapshot is loaded by then); rejects if the board fails. */
  ready(timeoutMs?: number): Promise<void>;
  /** Every event the board receives, as it arrives (only while the board is subscribed). */
  readonly events$: Observable<TaskEvent>;
  /**
   * Creates or updates a task: as `update_task` on the board's own socket when
   * the transport is `websocket` and the socket is open, else as
   * `POST /update_task` (so it never waits for a reconnect). Rejects with a
   * {@link TaskstreamError} carrying the server's message.
   */
  updateTask(patch: TaskPatch, options?: { idempotencyKey?: string }): Promise<BoardUpdateResult>;
}

function stripEvent(data: TaskUpdatedData): Task {
  const { event: _event, ...task } = data;
  return task;
}

/**
 * The state of all tasks as an Observable.
 *
 * It loads `GET /tasks`, subscribes to `/events` (or, with
 * `transport: 'websocket'`, to `/ws`) from the snapshot's `last_event_id`
 * (`0`, "from the start", when it is null) so that nothing falls between
 * snapshot and stream, and applies events in order: a `task_updated` older
 * than or as old as the task's current version is ignored; on `reset` it
 * closes the stream, reloads the snapshot and resubscribes from the new id.
 * A failed snapshot load is retried like the stream; 4xx answers are final.
 *
 * The result is shared (`shareReplay` with `refCount`): any number of UI
 * consumers use one connection, the last one to unsubscribe closes it, and
 * a late subscriber gets the current state at once.
 *
 * @example
 * ```ts
 * const board = taskBoard('', { accessToken });
 * board.subscribe(({ tasks }) => render([...tasks.values()]));
 * board.state$.subscribe(s => (badge.textContent = s));
 * ```
 */
export function taskBoard(baseUrl: string, options: BoardOptions = {}): TaskBoard {
  const transport: Transport = options.transport ?? 'sse';
  /** The socket of the current stream, when on `websocket`: the board publishes on it. */
  let socket: TaskSocket | undefined;
  const state = connectionState('closed');
  const conn = reporter(state);
  const events = new Subject<TaskEvent>();
  const random = options.random ?? Math.random;
  const filter = options.taskIds ? new Set(options.taskIds.map(taskKey)) : undefined;

  const source = new Observable<BoardState>((subscriber) => {
    let tasks = new Map<string, Task>();
    let lastEventId: string | null = null;
    let stream: Subscription | undefined;
    let retryTimer: ReturnType<typeof setTimeout> | undefined;
    let done = false;
    let attempt = 0;
    let loadedOnce = false;

    const emit = (change: BoardChange) => subscriber.next({ tasks, lastEventId, change });

    const fail = (err: unknown) => {
      if (done) return;
      done = true;
      stream?.unsubscribe();
      const error = err instanceof TaskstreamError ? err : new TaskstreamError(String(err));
      conn.set({ state: 'closed', reason: error.message, ...(error.status || error.closeCode ? { code: error.status ?? error.closeCode } : {}), error });
      subscriber.error(err);
    };

    const apply = (ev: TaskEvent) => {
      if (ev.type === 'task_updated') {
        const task = stripEvent(ev.data);
        const key = taskKey(task.task_id);
        lastEventId = ev.id || lastEventId;
        const current = tasks.get(key);
        if ((current && current.version >= task.version) || (filter && !filter.has(key))) return;
        tasks = new Map(tasks).set(key, task);
        emit({ kind: 'updated', key, task });
      } else if (ev.type === 'task_deleted') {
        const key = taskKey(ev.data.task_id);
        lastEventId = ev.id || lastEventId;
        if (!tasks.has(key)) return;
        tasks = new Map(tasks);
        tasks.delete(key);
        emit({ kind: 'deleted', key });
      }
    };

    const load = (reason?: string) => {
      retryTimer = undefined;
      conn.set({ state: loadedOnce || attempt > 0 ? 'reconnecting' : 'connecting', attempt, ...(reason ? { reason } : {}) });
      loadSnapshot(baseUrl, options).then(
        (snap) => {
          if (done) return;
          attempt = 0;
          loadedOnce = true;
          const next = new Map<string, Task>();
          for (const task of snap.tasks) {
            const key = taskKey(task.task_id);
            if (!filter || filter.has(key)) next.set(key, task);
          }
          tasks = next;
          lastEventId = snap.last_event_id;
          emit({ kind: 'snapshot' });
          subscribeFrom(snap.last_event_id ?? '0');
        },
        (err: unknown) => {
          if (done) return;
          if (!(err instanceof RetryableError)) {
            fail(err);
            return;
          }
          const delay = backoffDelay(attempt, options.backoff, random);
          attempt += 1;
          conn.set({ state: loadedOnce ? 'reconnecting' : 'connecting', reason: err.message, attempt, nextRetryAt: Date.now() + delay });
          retryTimer = setTimeout(() => load(err.message), delay);
        },
      );
    };

    // The inner stream's own 'closed' (on reset or teardown) is not the
    // board's: the board reports that itself. And a new stream after a reset
    // is a reconnect as far as a badge is concerned.
    let wasOpen = false;
    const innerState: ConnectionStateSink = {
      next: () => {},
      info: (i) => {
        if (i.state === 'closed') return;
        if (i.state === 'open') wasOpen = true;
        const { since: _since, ...rest } = i;
        conn.set({ ...rest, state: i.state === 'connecting' && wasOpen ? 'reconnecting' : i.state });
      },
    };

    const subscribeFrom = (from: string) => {
      // Created before subscribing, so that a reset delivered synchronously
      // can still unsubscribe it.
      const sub = new Subscription();
      stream = sub;
      let events$: Observable<TaskEvent>;
      if (transport === 'websocket') {
        const s = taskSocket(joinUrl(baseUrl, '/ws'), { ...options, lastEventId: from, state: innerState });
        socket = s;
        sub.add(() => {
          if (socket === s) socket = undefined;
        });
        events$ = s.events$;
      } else {
        events$ = fromEventSource(joinUrl(baseUrl, '/events'), { ...options, lastEventId: from, state: innerState });
      }
      sub.add(
        events$.subscribe({
          next: (ev) => {
            events.next(ev);
            if (ev.type === 'reset') {
              // Missed events: this stream is useless now; reload, then
              // resubscribe from the new snapshot's id.
              sub.unsubscribe();
              if (stream === sub) stream = undefined;
              load(`reset: ${ev.data.reason}`);
              return;
            }
            apply(ev);
          },
          error: fail,
          // The stream itself never completes.
        }),
      );
    };

    load();

    return () => {
      const failed = done;
      done = true;
      if (retryTimer !== undefined) clearTimeout(retryTimer);
      stream?.unsubscribe();
      if (!failed) conn.set({ state: 'closed' });
    };
  });

  const publish = async (patch: TaskPatch, opts: { idempotencyKey?: string } = {}): Promise<BoardUpdateResult> => {
    const s = socket;
    if (s && s.state === 'open') return { ...(await s.updateTask(patch, opts)), via: 'websocket' };
    const httpOptions: Parameters<typeof updateTask>[2] = { ...opts };
    const token = await currentToken(options);
    if (token) httpOptions.accessToken = token;
    if (options.withCredentials) httpOptions.withCredentials = options.withCredentials;
    if (options.fetch) httpOptions.fetch = options.fetch;
    return { ...(await updateTask(baseUrl, patch, httpOptions)), via: 'http' };
  };

  const shared = source.pipe(shareReplay({ bufferSize: 1, refCount: true }));
  return Object.assign(shared, {
    transport,
    state$: state.state$,
    info$: state.info$,
    ready: (timeoutMs?: number) => state.ready(timeoutMs),
    events$: events.asObservable(),
    updateTask: publish,
  });
}
