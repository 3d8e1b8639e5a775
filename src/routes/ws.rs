//! `GET /ws`: the same hub, replay and filter as `/events`, plus publishing, over one WebSocket.

use crate::auth::Access;
use crate::error::ApiError;
use crate::event::{Event, EventId};
use crate::hub::{Delivery, EndReason, Resume, SubscribeError, SubscriberSlot, Subscription};
use crate::limits::IpSlot;
use crate::middleware::peer_ip;
use crate::routes::connection::{peer, ConnectionLog};
use crate::service::{Open, PatchInput, Refusal};
use crate::state::AppState;
use crate::task::TaskId;
use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::{web, FromRequest, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, Session};
use bytes::Bytes;
use bytestring::ByteString;
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use std::cell::RefCell;
use std::collections::HashSet;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::SystemTime;
use tokio::time::{interval_at, MissedTickBehavior};

#[utoipa::path(
    get, path = "/ws", tag = "events",
    description = "The event stream and publishing over one WebSocket (docs/api.md, GET /ws). Auth failures close the socket with 1008 after the upgrade, since browsers cannot read a refused upgrade's status.",
    responses(
        (status = 101, description = "switching to the WebSocket protocol"),
        (status = 400, description = "not a WebSocket upgrade request", body = crate::routes::schemas::ErrorBody),
        (status = 403, description = "a browser page of another site: Origin is neither this server nor --cors-origin", body = crate::routes::schemas::ErrorBody),
    )
)]
pub async fn ws(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
    origins: web::Data<crate::origin::AllowedOrigins>,
) -> Result<HttpResponse, ApiError> {
    crate::origin::check_ws_origin(&req, &origins)?;
    let (response, session, messages) = actix_ws::handle(&req, body)
        .map_err(|e| ApiError::BadRequest(format!("GET /ws needs a WebSocket upgrade: {e}")))?;
    // A frame above twice `--max-body-bytes` is refused by the codec, which closes with 1009; a
    // single frame above the limit but below that gets an `error` message and the connection
    // stays open, like a `413` on `POST /update_task`. A fragmented message is buffered until
    // its last frame, so its buffer is bounded by the limit itself (1009 past it): an unfinished
    // one costs at most `--max-body-bytes`.
    let max_body = state.service.limits().max_body_bytes;
    let messages = messages
        .max_frame_size(2 * max_body)
        .aggregate_continuations()
        .max_continuation_size(max_body);
    let heartbeat = form_urlencoded::parse(req.query_string().as_bytes())
        .any(|(key, value)| key == "heartbeat" && matches!(value.as_ref(), "1" | "true"))
        .then(|| heartbeat_ws_message(state.keep_alive));
    // A refused upgrade shows in a browser only as close 1006, which looks like "retry"; so the
    // upgrade goes through and an auth failure is the close code 1008 with the reason.
    let access = Access::extract(&req).await;
    // The connection counts against both caps from the upgrade, not from its subscribe: one
    // that never subscribes costs as much as one that does.
    let places = match &access {
        Ok(_) => take_places(&state, &req),
        Err(_) => Err(Stop(None)),
    };
    let log = ConnectionLog::open(
        "websocket client",
        peer(&req),
        state.metrics.ws_clients.clone(),
        format_args!(
            "sub={}",
            access
                .as_ref()
                .ok()
                .and_then(Access::subject)
                .unwrap_or("-")
        ),
    );
    let feed = Feed::default();
    // Events go straight from the subscription into the response, as `/events` does: not
    // through the session's channel and actix-ws's per-socket frame encoding.
    let response = response.map_body(|_, replies| {
        BoxBody::new(WsBody {
            replies,
            feed: feed.clone(),
        })
    });
    let connection = Connection {
        state: state.into_inner(),
        req,
        session,
        feed,
        place: None,
        ip_slot: None,
        unanswered_pings: 0,
        heartbeat,
        log,
    };
    actix_web::rt::spawn(connection.run(access, places, messages));
    Ok(response)
}

/// A place under `--max-subscribers` and one under `--max-subscribers-per-ip`, or the close that
/// refuses the connection (1013, as a full hub always did).
fn take_places(
    state: &AppState,
    req: &HttpRequest,
) -> Result<(SubscriberSlot, Option<IpSlot>), Stop> {
    let place = state
        .hub()
        .take_place()
        .map_err(|_| close(CloseCode::Again, "too many subscribers"))?;
    let ip_slot = state
        .service
        .limits()
        .subscriber_slot(peer_ip(req))
        .map_err(|limited| close(CloseCode::Again, &limited.message))?;
    Ok((place, ip_slot))
}

/// RFC 6455 7.4.1: 1009 for a message too big to process, 1007 for text that is not UTF-8; 1002
/// for the rest. actix-ws reports the first two as I/O errors, told apart by kind and text.
fn protocol_close_code(error: &actix_ws::ProtocolError) -> CloseCode {
    match error {
        actix_ws::ProtocolError::Overflow => CloseCode::Size,
        actix_ws::ProtocolError::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            CloseCode::Invalid
        }
        actix_ws::ProtocolError::Io(e) if e.to_string().contains("maximum continuation size") => {
            CloseCode::Size
        }
        _ => CloseCode::Protocol,
    }
}

struct Connection {
    state: Arc<AppState>,
    /// The upgrade request: the client's address for the per-IP limits.
    req: HttpRequest,
    /// Replies, pings, pongs and the close frame; events go through `feed`.
    session: Session,
    /// The subscription, shared with the response body that delivers its events.
    feed: Feed,
    /// Its place under `--max-subscribers` while it has no subscription (which holds its own).
    place: Option<SubscriberSlot>,
    /// Its place under `--max-subscribers-per-ip`, from the upgrade to the end.
    ip_slot: Option<IpSlot>,
    unanswered_pings: u32,
    /// `?heartbeat=1`: a message the page can see on every ping (browsers hide pings from JS),
    /// so it notices a connection that went silent.
    heartbeat: Option<ByteString>,
    log: ConnectionLog,
}

/// The connection cannot go on: close it with this reason (`None`: the client is already gone).
struct Stop(Option<CloseReason>);

fn close(code: CloseCode, description: &str) -> Stop {
    Stop(Some(CloseReason {
        code,
        description: Some(description.to_owned()),
    }))
}

impl Connection {
    async fn run(
        mut self,
        access: Result<Access, ApiError>,
        places: Result<(SubscriberSlot, Option<IpSlot>), Stop>,
        mut messages: AggregatedMessageStream,
    ) {
        let keep_alive = self.state.keep_alive;
        let stop = match (access, places) {
            (Err(error), _) => close(CloseCode::Policy, &error.to_string()),
            (Ok(_), Err(refused)) => refused,
            (Ok(access), Ok((place, ip_slot))) => {
                self.place = Some(place);
                self.ip_slot = ip_slot;
                match self.send_heartbeat().await {
                    Err(stop) => stop,
                    Ok(()) => self.serve(&access, &mut messages).await,
                }
            }
        };
        // Free the hub place before the close handshake, which a dead client never finishes; and
        // with the subscription gone the body sends no event after the close frame.
        self.log.events = self.feed.events();
        self.feed.replace(None);
        self.place = None;
        self.ip_slot = None;
        if let Stop(Some(reason)) = stop {
            let _ = tokio::time::timeout(keep_alive, self.session.close(Some(reason))).await;
        }
    }

    /// Until the connection must stop: messages, the subscription's end, pings, expiry and
    /// shutdown. The events themselves the response body takes from the subscription.
    async fn serve(&mut self, access: &Access, messages: &mut AggregatedMessageStream) -> Stop {
        let keep_alive = self.state.keep_alive;
        let idle_timeout = self.state.service.limits().ws_idle_timeout;
        let mut ping = interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Made once, not per turn of the loop: each `cancelled()` registers with the token's
        // shared waiter list, and every subscriber of an event would take its lock twice.
        let closing = self.state.hub().closing();
        let closing = closing.cancelled();
        tokio::pin!(closing);
        let expiry = token_expiry(access);
        tokio::pin!(expiry);
        // Until it subscribes, a connection must send a message at least this often: pings,
        // pongs and an unfinished fragmented message do not count, so a socket cannot hold its
        // places and its fragment buffer for good.
        let mut idle_until = tokio::time::Instant::now() + idle_timeout;
        let feed = self.feed.clone();
        loop {
            let unsubscribed = !feed.subscribed();
            let step = tokio::select! {
                () = &mut closing => Err(close(CloseCode::Away, "server shutting down")),
                () = &mut expiry => Err(close(CloseCode::Policy, "token expired")),
                () = tokio::time::sleep_until(idle_until), if unsubscribed => {
                    let idle = format!("no subscribe and no message within {} s", idle_timeout.as_secs());
                    Err(close(CloseCode::Normal, &idle))
                }
                message = messages.next() => {
                    if matches!(message, Some(Ok(AggregatedMessage::Text(_) | AggregatedMessage::Binary(_)))) {
                        idle_until = tokio::time::Instant::now() + idle_timeout;
                    }
                    // A reply comes before any event published after the message was read (an
                    // ack before the update's own event), as when one task sent both.
                    feed.hold(true);
                    let handled = self.on_message(access, message).await;
                    feed.hold(false);
                    handled
                }
                reason = feed.ended() => Err(end_close(reason)),
                _ = ping.tick() => self.on_ping_tick().await,
            };
            if let Err(stop) = step {
                return stop;
            }
        }
    }

    /// Sends one reply, bounded in time: a client that stops reading fills its queue, and is
    /// then treated like one that stopped answering pings. The timer is started only when the
    /// queue is full, which it almost never is.
    async fn send(&mut self, message: ByteString) -> Result<(), Stop> {
        let keep_alive = self.state.keep_alive;
        let mut send = pin!(self.session.text(message));
        if let Poll::Ready(sent) = poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await {
            return within_time(Ok(sent));
        }
        within_time(tokio::time::timeout(2 * keep_alive, send).await)
    }

    async fn send_error(&mut self, request_id: Value, error: impl ToString) -> Result<(), Stop> {
        let message =
            json!({"type": "error", "request_id": request_id, "error": error.to_string()});
        self.send(message.to_string().into()).await
    }

    async fn on_ping_tick(&mut self) -> Result<(), Stop> {
        if self.unanswered_pings >= 2 {
            return Err(close(CloseCode::Error, "no pong to two pings"));
        }
        self.unanswered_pings += 1;
        let ping = tokio::time::timeout(self.state.keep_alive, self.session.ping(b"")).await;
        within_time(ping)?;
        self.send_heartbeat().await
    }

    async fn send_heartbeat(&mut self) -> Result<(), Stop> {
        match self.heartbeat.clone() {
            Some(heartbeat) => self.send(heartbeat).await,
            None => Ok(()),
        }
    }

    async fn on_message(
        &mut self,
        access: &Access,
        message: Option<Result<AggregatedMessage, actix_ws::ProtocolError>>,
    ) -> Result<(), Stop> {
        match message {
            None => Err(Stop(None)),
            Some(Err(actix_ws::ProtocolError::Overflow)) => {
                Err(close(CloseCode::Size, "message too large"))
            }
            Some(Err(e)) => Err(close(protocol_close_code(&e), &e.to_string())),
            Some(Ok(AggregatedMessage::Text(text))) => self.on_text(access, &text).await,
            Some(Ok(AggregatedMessage::Binary(_))) => {
                self.send_error(
                    Value::Null,
                    "binary messages are not supported; send JSON text",
                )
                .await
            }
            Some(Ok(AggregatedMessage::Ping(payload))) => {
                self.session.pong(&payload).await.map_err(|_| Stop(None))
            }
            Some(Ok(AggregatedMessage::Pong(_))) => {
                self.unanswered_pings = 0;
                Ok(())
            }
            Some(Ok(AggregatedMessage::Close(reason))) => Err(Stop(reason)),
        }
    }

    async fn on_text(&mut self, access: &Access, text: &str) -> Result<(), Stop> {
        let max = self.state.service.limits().max_body_bytes;
        if text.len() > max {
            let error = Refusal::TooLarge(max);
            return self.send_error(Value::Null, error).await;
        }
        let mut fields = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(fields)) => fields,
            Ok(_) => {
                return self
                    .send_error(Value::Null, "a message must be a JSON object")
                    .await
            }
            Err(e) => {
                return self
                    .send_error(Value::Null, format!("message is not valid JSON: {e}"))
                    .await
            }
        };
        let request_id = fields.remove("request_id").unwrap_or(Value::Null);
        match fields.remove("type").as_ref().and_then(Value::as_str) {
            Some("subscribe") => self.on_subscribe(access, request_id, fields).await,
            Some("update_task") => self.on_update(access, request_id, fields).await,
            Some(other) => {
                let error =
                    format!("unknown message type `{other}`; expected subscribe or update_task");
                self.send_error(request_id, error).await
            }
            None => {
                self.send_error(request_id, "type is required: subscribe or update_task")
                    .await
            }
        }
    }

    /// Starts, or restarts, delivery with the same replay, reset and filter rules as `/events`.
    async fn on_subscribe(
        &mut self,
        access: &Access,
        request_id: Value,
        mut fields: Map<String, Value>,
    ) -> Result<(), Stop> {
        let ids = match parse_task_ids(fields.remove("task_ids")) {
            Ok(ids) => ids,
            Err(error) => return self.send_error(request_id, error).await,
        };
        let resume = match fields.remove("last_event_id") {
            None | Some(Value::Null) => Resume::Live,
            Some(Value::String(id)) => Resume::from_client(Some(&id)),
            Some(_) => Resume::Malformed,
        };
        if let Some(unknown) = fields.keys().next() {
            let error =
                format!("unknown field `{unknown}` in subscribe; allowed: task_ids, last_event_id");
            return self.send_error(request_id, error).await;
        }
        // The connection's hub place (or its old subscription's) is given back just before the
        // new subscription takes one; its per-IP place it keeps, so no peer is passed.
        self.feed.replace(None);
        self.place = None;
        let opened = self
            .state
            .service
            .subscribe(access, None, resume, ids)
            .await;
        if opened.is_err() {
            // Unsubscribed again: the connection holds a place of its own until it subscribes.
            match self.state.hub().take_place() {
                Ok(place) => self.place = Some(place),
                Err(_) => return Err(close(CloseCode::Again, "too many subscribers")),
            }
        }
        match opened {
            Ok(Open { subscription, .. }) => {
                self.feed.replace(Some(subscription));
                Ok(())
            }
            Err(Refusal::Limited(limited)) => Err(close(CloseCode::Again, &limited.message)),
            Err(Refusal::Subscribe(SubscribeError::Full(_))) => {
                Err(close(CloseCode::Again, "too many subscribers"))
            }
            Err(Refusal::Subscribe(SubscribeError::Closed)) => {
                Err(close(CloseCode::Away, "server shutting down"))
            }
            // Asked for tasks the token may not see: the socket stays, as a 403 would.
            Err(refused) => self.send_error(request_id, refused).await,
        }
    }

    /// Publishes exactly like `POST /update_task`: the same validation, limits and idempotency.
    async fn on_update(
        &mut self,
        access: &Access,
        request_id: Value,
        fields: Map<String, Value>,
    ) -> Result<(), Stop> {
        let outcome = self.publish(access, fields).await;
        match outcome {
            Ok(accepted) => {
                let ack = json!({
                    "type": "ack",
                    "request_id": request_id,
                    "event_id": accepted.event_id,
                    "task": &*accepted.task,
                });
                self.send(ack.to_string().into()).await
            }
            Err(error) => self.send_error(request_id, error).await,
        }
    }

    /// Publishes exactly like `POST /update_task`: the service applies the same steps.
    async fn publish(
        &self,
        access: &Access,
        mut fields: Map<String, Value>,
    ) -> Result<Arc<crate::backend::Accepted>, Refusal> {
        let key = match fields.remove("idempotency_key") {
            None | Some(Value::Null) => None,
            Some(Value::String(key)) => Some(key),
            // Not a string: refused as an invalid key.
            Some(_) => Some(String::new()),
        };
        let body = std::future::ready(Ok::<_, Refusal>(PatchInput::Fields(fields)));
        self.state
            .service
            .publish(access, peer_ip(&self.req), key.as_deref(), body)
            .await
    }
}

/// A send that had to finish in time: a client that stops reading fills its queue, and is closed
/// like one that stopped answering pings (1011: 1008 stays reserved for auth failures).
fn within_time(
    sent: Result<Result<(), actix_ws::Closed>, tokio::time::error::Elapsed>,
) -> Result<(), Stop> {
    match sent {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_closed)) => Err(Stop(None)),
        Err(_elapsed) => Err(close(CloseCode::Error, "client is not reading")),
    }
}

/// Resolves when the token expires (never when auth is off).
async fn token_expiry(access: &Access) {
    match access.expires_at() {
        Some(expires) => {
            let left = expires
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(left).await
        }
        None => std::future::pending().await,
    }
}

fn parse_task_ids(value: Option<Value>) -> Result<HashSet<TaskId>, String> {
    let ids = match value {
        None | Some(Value::Null) => return Ok(HashSet::new()),
        Some(Value::Array(ids)) => ids,
        Some(_) => return Err("task_ids must be an array of task ids".into()),
    };
    ids.iter()
        .map(|id| TaskId::from_json(id).map_err(|e| format!("task_ids: {id}: {e}")))
        .collect()
}

/// The subscription's end as a close: the code tells the client what to do next.
fn end_close(reason: EndReason) -> Stop {
    match reason {
        EndReason::Shutdown => close(CloseCode::Away, "server shutting down"),
        EndReason::TokenExpired => close(CloseCode::Policy, "token expired"),
    }
}

/// The subscription, between the connection task (which replaces it on `subscribe` and drops
/// it at the end) and the response body (which polls it for events). Both run on the worker
/// thread that owns the socket, so a `RefCell` is enough.
#[derive(Clone, Default)]
struct Feed(Rc<RefCell<FeedState>>);

#[derive(Default)]
struct FeedState {
    subscription: Option<Subscription>,
    /// The task is handling a client message: its reply must go out before the next event.
    held: bool,
    /// The subscription ended: the body takes nothing more from it, and the task closes.
    ended: Option<EndReason>,
    /// Events the body sent, for the connection's log.
    events: u64,
    /// To wake the body when a subscription arrives or a hold is lifted.
    body: Option<Waker>,
    /// To wake the task when the subscription ends.
    task: Option<Waker>,
}

impl Feed {
    /// Drops the old subscription, and with it its hub place, before the caller takes another.
    fn replace(&self, subscription: Option<Subscription>) {
        let (old, body) = {
            let mut state = self.0.borrow_mut();
            let old = std::mem::replace(&mut state.subscription, subscription);
            (old, state.body.clone())
        };
        drop(old);
        if let Some(body) = body {
            body.wake();
        }
    }

    fn subscribed(&self) -> bool {
        self.0.borrow().subscription.is_some()
    }

    fn events(&self) -> u64 {
        self.0.borrow().events
    }

    fn hold(&self, held: bool) {
        let mut state = self.0.borrow_mut();
        state.held = held;
        if !held {
            if let Some(body) = &state.body {
                body.wake_by_ref();
            }
        }
    }

    /// Resolves when the subscription has ended (shutdown or token expiry).
    fn ended(&self) -> impl Future<Output = EndReason> + '_ {
        poll_fn(|cx| {
            let mut state = self.0.borrow_mut();
            match state.ended {
                Some(reason) => Poll::Ready(reason),
                None => {
                    set_waker(&mut state.task, cx);
                    Poll::Pending
                }
            }
        })
    }

    /// The next delivery as a WebSocket frame: an event's shared one, or a rare reset or
    /// compacted announcement encoded here (in order, so it comes before the events after it).
    fn poll_frame(&self, cx: &mut Context<'_>) -> Poll<Bytes> {
        let mut state = self.0.borrow_mut();
        set_waker(&mut state.body, cx);
        if state.held || state.ended.is_some() {
            return Poll::Pending;
        }
        let Some(subscription) = state.subscription.as_mut() else {
            // Nothing is delivered before the client subscribes.
            return Poll::Pending;
        };
        let reason = match ready!(subscription.poll_next_unpin(cx)) {
            Some(Delivery::Event(event)) => {
                state.events += 1;
                return Poll::Ready(event.ws_frame(event_frame));
            }
            Some(Delivery::Reset { newest, reason }) => {
                return Poll::Ready(text_frame(
                    reset_ws_message(newest, reason.as_str()).as_bytes(),
                ));
            }
            Some(Delivery::Compacted { since, tasks }) => {
                return Poll::Ready(text_frame(compacted_ws_message(since, tasks).as_bytes()));
            }
            Some(Delivery::End(reason)) => reason,
            None => EndReason::Shutdown,
        };
        // The task closes the socket through the session, with the close code for `reason`.
        state.ended = Some(reason);
        if let Some(task) = state.task.take() {
            task.wake();
        }
        Poll::Pending
    }
}

fn set_waker(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(waker) if waker.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// The response body: actix-ws's own (replies, pings, pongs, the close frame), and between them
/// the subscription's events, each the frame every socket shares.
struct WsBody {
    replies: BoxBody,
    feed: Feed,
}

impl MessageBody for WsBody {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        // Replies first: they are few, and a pong or a close must not wait behind a replay.
        match Pin::new(&mut this.replies).poll_next(cx) {
            Poll::Ready(Some(chunk)) => return Poll::Ready(Some(chunk)),
            // actix-ws ends its body after the close frame: nothing may follow it.
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        this.feed.poll_frame(cx).map(|frame| Some(Ok(frame)))
    }
}

/// An event's message in one frame, built once per event and shared by every socket.
fn event_frame(event: &Event) -> Bytes {
    text_frame(event_message(event).as_bytes())
}

/// One final, unmasked text frame, as a server sends it, encoded by actix-http's own encoder
/// (the one actix-ws uses for its replies).
fn text_frame(payload: &[u8]) -> Bytes {
    let mut frame = bytes::BytesMut::with_capacity(payload.len() + 10);
    actix_http::ws::Parser::write_message(
        &mut frame,
        payload,
        actix_http::ws::OpCode::Text,
        true,
        false,
    );
    frame.freeze()
}

/// `{"type":"event","id":ID,"event":KIND,"data":DATA}`: `data` exactly as in the SSE stream.
fn event_message(event: &Event) -> ByteString {
    // `data` is serde_json's output, so it is valid UTF-8 and valid JSON.
    let data = std::str::from_utf8(&event.data).expect("event data is UTF-8");
    let (id, kind) = (event.id, event.kind.name());
    format!(r#"{{"type":"event","id":"{id}","event":"{kind}","data":{data}}}"#).into()
}

/// The WebSocket form of a `reset`: the same fields as an event message, so clients handle both alike.
fn reset_ws_message(newest: EventId, reason: &str) -> ByteString {
    serde_json::json!({
        "type": "reset",
        "id": newest,
        "event": "reset",
        "data": {"event": "reset", "last_event_id": newest, "reason": reason},
    })
    .to_string()
    .into()
}

/// Announces a compacted catch-up (SPEC, "Resume without reload"): `tasks` events follow.
fn compacted_ws_message(since: EventId, tasks: usize) -> ByteString {
    format!(r#"{{"type":"compacted","since":"{since}","tasks":{tasks}}}"#).into()
}

/// The WebSocket form of the heartbeat.
fn heartbeat_ws_message(keep_alive: std::time::Duration) -> ByteString {
    format!(
        r#"{{"type":"heartbeat","keep_alive_ms":{}}}"#,
        keep_alive.as_millis()
    )
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;
    use crate::task::TaskPatch;
    use actix_codec::Decoder;
    use actix_http::ws::{Codec, Frame};

    /// What a client reads from `frame`: it must be exactly one text frame.
    fn decode_text(frame: &Bytes) -> Bytes {
        // A client's codec: it expects a server's frames unmasked.
        let mut codec = Codec::new().client_mode().max_size(1 << 20);
        let mut buffer = bytes::BytesMut::from(&frame[..]);
        let decoded = codec.decode(&mut buffer).unwrap().expect("a whole frame");
        assert!(buffer.is_empty(), "one frame, nothing after it");
        match decoded {
            Frame::Text(text) => text,
            other => panic!("not a text frame: {other:?}"),
        }
    }

    #[test]
    fn the_websocket_message_wraps_the_same_data_and_is_built_once() {
        let (id, patch) = TaskPatch::parse(br#"{"task_id": 101}"#).unwrap();
        let task = patch.apply(id, None, "2026-11-22T10:00:00.123Z".into());
        let event = Event::updated(EventId { epoch: 5, seq: 7 }, &task);
        let frame = event.ws_frame(event_frame);
        let parsed: serde_json::Value = serde_json::from_slice(&decode_text(&frame)).unwrap();
        assert_eq!(parsed["type"], "event");
        assert_eq!(parsed["id"], "5-7");
        assert_eq!(parsed["event"], "task_updated");
        assert_eq!(
            parsed["data"],
            serde_json::from_slice::<serde_json::Value>(&event.data).unwrap()
        );
    }

    #[test]
    fn an_events_frame_decodes_to_its_message_at_every_length_encoding_and_is_shared() {
        // Payloads with a 7-bit, a 16-bit and a 64-bit length.
        for padding in [10, 1_000, 70_000] {
            let data = format!(
                r#"{{"event":"task_deleted","task_id":"{}"}}"#,
                "x".repeat(padding)
            );
            let event = Event::from_stored(
                EventId { epoch: 1, seq: 2 },
                crate::task::TaskId::Number(1),
                EventKind::TaskDeleted,
                data,
            )
            .unwrap();
            let message = event_message(&event);
            let frame = event.ws_frame(event_frame);
            assert_eq!(decode_text(&frame), message.as_bytes(), "{padding}");
            assert_eq!(
                event.ws_frame(|_| unreachable!("built once")).as_ptr(),
                frame.as_ptr(),
                "shared, not rebuilt"
            );
        }
    }

    #[test]
    fn text_frames_decode_on_each_side_of_the_length_boundaries() {
        for len in [0, 125, 126, 127, 65_535, 65_536, 70_000] {
            let frame = text_frame("a".repeat(len).as_bytes());
            let header = match len {
                0..=125 => 2,
                126..=65_535 => 4,
                _ => 10,
            };
            assert_eq!(frame.len(), header + len, "{len}");
            assert_eq!(decode_text(&frame), "a".repeat(len).as_bytes(), "{len}");
        }
    }
}
