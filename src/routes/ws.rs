//! `GET /ws`: the same hub, replay and filter as `/events`, plus publishing, over one WebSocket.

use crate::app::AppState;
use crate::auth::Access;
use crate::backend::idempotency_key;
use crate::error::ApiError;
use crate::event::{heartbeat_ws_message, reset_ws_message};
use crate::hub::{Delivery, EndReason, Resume, SubscribeError, Subscription};
use crate::limits::IpSlot;
use crate::routes::connection::{peer, ConnectionLog};
use crate::task::{TaskId, TaskPatch};
use actix_web::{web, FromRequest, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, Session};
use bytestring::ByteString;
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::time::{interval_at, MissedTickBehavior};

#[utoipa::path(
    get, path = "/ws", tag = "events",
    description = "The event stream and publishing over one WebSocket (docs/api.md, GET /ws). Auth failures close the socket with 1008 after the upgrade, since browsers cannot read a refused upgrade's status.",
    responses(
        (status = 101, description = "switching to the WebSocket protocol"),
        (status = 400, description = "not a WebSocket upgrade request", body = crate::openapi::ErrorBody),
    )
)]
pub async fn ws(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (response, session, messages) = actix_ws::handle(&req, body)
        .map_err(|e| ApiError::BadRequest(format!("GET /ws needs a WebSocket upgrade: {e}")))?;
    // Frames (and fragmented messages) above twice `--max-body-bytes` are refused by the codec,
    // which closes with 1009; messages above the limit but below that get an `error` message and
    // the connection stays open, like a `413` on `POST /update_task`.
    let max_frame = 2 * state.limits.max_body_bytes;
    let messages = messages
        .max_frame_size(max_frame)
        .aggregate_continuations()
        .max_continuation_size(max_frame);
    let heartbeat = form_urlencoded::parse(req.query_string().as_bytes())
        .any(|(key, value)| key == "heartbeat" && matches!(value.as_ref(), "1" | "true"))
        .then(|| heartbeat_ws_message(state.keep_alive));
    // A refused upgrade shows in a browser only as close 1006, which looks like "retry"; so the
    // upgrade goes through and an auth failure is the close code 1008 with the reason.
    let access = Access::extract(&req).await;
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
        ip_slot: None,
        unanswered_pings: 0,
        heartbeat,
        log,
    };
    actix_web::rt::spawn(connection.run(access, messages));
    Ok(response)
}

struct Connection {
    state: Arc<AppState>,
    /// The upgrade request: the client's address for the per-IP limits.
    req: HttpRequest,
    session: Session,
    subscription: Option<Subscription>,
    /// Its place under `--max-subscribers-per-ip` while subscribed.
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
        mut messages: AggregatedMessageStream,
    ) {
        let keep_alive = self.state.keep_alive;
        let mut ping = interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let closing = self.state.hub.closing();
        let stop = match access {
            Err(error) => close(CloseCode::Policy, &error.to_string()),
            Ok(_) if self.state.hub.is_full() => close(CloseCode::Again, "too many subscribers"),
            Ok(access) => match self.send_heartbeat().await {
                Err(stop) => stop,
                Ok(()) => {
                    let expiry = token_expiry(&access);
                    tokio::pin!(expiry);
                    loop {
                        let step = tokio::select! {
                            _ = closing.cancelled() => Err(close(CloseCode::Away, "server shutting down")),
                            () = &mut expiry => Err(close(CloseCode::Policy, "token expired")),
                            message = messages.next() => self.on_message(&access, message).await,
                            delivery = next_delivery(&mut self.subscription) => self.on_delivery(delivery).await,
                            _ = ping.tick() => self.on_ping_tick().await,
                        };
                        if let Err(stop) = step {
                            break stop;
                        }
                    }
                }
            },
        };
        // Free the hub place before the close handshake, which a dead client never finishes.
        self.subscription = None;
        self.ip_slot = None;
        if let Stop(Some(reason)) = stop {
            let _ = tokio::time::timeout(keep_alive, self.session.close(Some(reason))).await;
        }
    }

    /// Sends one message, bounded in time: a client that stops reading fills its queue, and is
    /// then treated like one that stopped answering pings.
    async fn send(&mut self, message: ByteString) -> Result<(), Stop> {
        within_time(
            tokio::time::timeout(2 * self.state.keep_alive, self.session.text(message)).await,
        )
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

    async fn on_delivery(&mut self, delivery: Option<Delivery>) -> Result<(), Stop> {
        match delivery {
            Some(Delivery::Event(event)) => {
                self.log.events += 1;
                self.send(event.ws_message()).await
            }
            Some(Delivery::Reset { newest, reason }) => {
                self.send(reset_ws_message(newest, reason.as_str())).await
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
            Some(Err(e)) => Err(close(CloseCode::Protocol, &e.to_string())),
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
        let max = self.state.limits.max_body_bytes;
        if text.len() > max {
            let error = format!("message is larger than {max} bytes (--max-body-bytes)");
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
        let filter = match parse_task_ids(fields.remove("task_ids"))
            .and_then(|ids| access.task_filter(ids).map_err(|e| e.to_string()))
        {
            Ok(filter) => filter,
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
        // The old subscription's places are given back before the new one takes them.
        self.subscription = None;
        self.ip_slot = None;
        match self.state.limits.subscriber_slot(&self.req) {
            Ok(slot) => self.ip_slot = slot,
            Err(_) => {
                return Err(close(
                    CloseCode::Again,
                    "too many subscribers from this address",
                ))
            }
        }
        match self.state.backend.subscribe(resume, filter).await {
            Ok(subscription) => {
                self.subscription = Some(subscription);
                Ok(())
            }
            Err(SubscribeError::Full(_)) => Err(close(CloseCode::Again, "too many subscribers")),
            Err(SubscribeError::Closed) => Err(close(CloseCode::Away, "server shutting down")),
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
                    "task": accepted.task,
                });
                self.send(ack.to_string().into()).await
            }
            Err(error) => self.send_error(request_id, error).await,
        }
    }

    /// The steps of `POST /update_task`, in its order: rate limit, idempotency key, body,
    /// permission, then the store.
    async fn publish(
        &self,
        access: &Access,
        mut fields: Map<String, Value>,
    ) -> Result<Arc<crate::backend::Accepted>, ApiError> {
        self.state.limits.check_publish(access, &self.req)?;
        let key = match fields.remove("idempotency_key") {
            None | Some(Value::Null) => None,
            Some(Value::String(key)) => Some(idempotency_key(&key)),
            Some(_) => Some(idempotency_key("")),
        }
        .transpose()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let (task_id, patch) =
            TaskPatch::from_fields(fields).map_err(|e| ApiError::BadRequest(e.0))?;
        access.check_publish(&task_id)?;
        let key = key.map(|key| access.scope_idempotency_key(key));
        Ok(self.state.backend.update(task_id, patch, key).await?)
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
