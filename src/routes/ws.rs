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
use actix_web::{web, FromRequest, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, Session};
use bytestring::ByteString;
use futures_util::{FutureExt, StreamExt};
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::SystemTime;
use tokio::time::{interval_at, MissedTickBehavior};

/// Deliveries sent in one go before the connection looks at its other work again (a client's
/// messages, pings, shutdown): a replay of thousands must not keep those waiting.
const MAX_DELIVERIES_A_TURN: usize = 64;

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
    let connection = Connection {
        state: state.into_inner(),
        req,
        session,
        subscription: None,
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
    session: Session,
    subscription: Option<Subscription>,
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
        // Free the hub place before the close handshake, which a dead client never finishes.
        self.subscription = None;
        self.place = None;
        self.ip_slot = None;
        if let Stop(Some(reason)) = stop {
            let _ = tokio::time::timeout(keep_alive, self.session.close(Some(reason))).await;
        }
    }

    /// Until the connection must stop: messages, deliveries, pings, expiry and shutdown.
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
        loop {
            let unsubscribed = self.subscription.is_none();
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
                    self.on_message(access, message).await
                }
                delivery = next_delivery(&mut self.subscription) => self.on_deliveries(delivery).await,
                _ = ping.tick() => self.on_ping_tick().await,
            };
            if let Err(stop) = step {
                return stop;
            }
        }
    }

    /// Sends one message, bounded in time: a client that stops reading fills its queue, and is
    /// then treated like one that stopped answering pings. The timer is started only when the
    /// queue is full: one per message and subscriber cost a clock read and a timer-wheel entry
    /// on every delivery.
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

    /// Sends this delivery and every one already waiting, without a turn of the `select!` (which
    /// polls every other branch again) per event.
    async fn on_deliveries(&mut self, delivery: Option<Delivery>) -> Result<(), Stop> {
        self.on_delivery(delivery).await?;
        for _ in 1..MAX_DELIVERIES_A_TURN {
            let Some(subscription) = self.subscription.as_mut() else {
                break;
            };
            match subscription.next().now_or_never() {
                Some(delivery) => self.on_delivery(delivery).await?,
                None => break,
            }
        }
        Ok(())
    }

    async fn on_delivery(&mut self, delivery: Option<Delivery>) -> Result<(), Stop> {
        match delivery {
            Some(Delivery::Event(event)) => {
                self.log.events += 1;
                self.send(event.text_message(event_message)).await
            }
            Some(Delivery::Reset { newest, reason }) => {
                self.send(reset_ws_message(newest, reason.as_str())).await
            }
            Some(Delivery::Compacted { since, tasks }) => {
                self.send(compacted_ws_message(since, tasks)).await
            }
            Some(Delivery::End(EndReason::Shutdown)) | None => {
                Err(close(CloseCode::Away, "server shutting down"))
            }
            Some(Delivery::End(EndReason::TokenExpired)) => {
                Err(close(CloseCode::Policy, "token expired"))
            }
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
        self.subscription = None;
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
                self.subscription = Some(subscription);
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

async fn next_delivery(subscription: &mut Option<Subscription>) -> Option<Delivery> {
    match subscription {
        Some(subscription) => subscription.next().await,
        // Nothing is delivered before the client subscribes.
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
    use crate::task::TaskPatch;

    #[test]
    fn the_websocket_message_wraps_the_same_data_and_is_built_once() {
        let (id, patch) = TaskPatch::parse(br#"{"task_id": 101}"#).unwrap();
        let task = patch.apply(id, None, "2026-11-22T10:00:00.123Z".into());
        let event = Event::updated(EventId { epoch: 5, seq: 7 }, &task);
        let message = event.text_message(event_message);
        let parsed: serde_json::Value = serde_json::from_str(&message).unwrap();
        assert_eq!(parsed["type"], "event");
        assert_eq!(parsed["id"], "5-7");
        assert_eq!(parsed["event"], "task_updated");
        assert_eq!(
            parsed["data"],
            serde_json::from_slice::<serde_json::Value>(&event.data).unwrap()
        );
        assert_eq!(
            event
                .text_message(|_| unreachable!("built once"))
                .as_bytes()
                .as_ptr(),
            message.as_bytes().as_ptr(),
            "shared, not rebuilt"
        );
    }
}
