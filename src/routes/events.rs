//! `GET /events`: a subscription from the hub as a `text/event-stream` of shared, pre-encoded frames.

use crate::auth::Access;
use crate::error::ApiError;
use crate::event::{reset_frame, EventId};
use crate::hub::{Delivery, Resume, Subscription};
use crate::limits::IpSlot;
use crate::middleware::peer_ip;
use crate::routes::connection::{peer, ConnectionLog};
use crate::service::Open;
use crate::state::AppState;
use crate::task::TaskId;
use actix_web::body::{BodySize, MessageBody};
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::HashSet;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{interval_at, Interval, MissedTickBehavior};

#[utoipa::path(
    get, path = "/events", tag = "events",
    description = "The event stream (docs/events.md): a retry field, then replayed and live events, and keep-alive comments.",
    params(
        ("task_id" = Option<Vec<String>>, Query, description = "only these tasks' events (repeated or comma-separated)"),
        ("last_event_id" = Option<String>, Query, description = "resume after this id; the Last-Event-ID header wins"),
        ("Last-Event-ID" = Option<String>, Header, nullable = false, description = "resume after this id (browsers send it on reconnect)"),
        ("heartbeat" = Option<String>, Query, description = "1: a named `heartbeat` event at once and on every idle keep-alive tick, instead of comments (a browser EventSource cannot see comments)"),
    ),
    responses(
        (status = 200, description = "the stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "an invalid task_id in the filter", body = crate::routes::schemas::ErrorBody),
        (status = 429, description = "over --max-subscribers-per-ip", body = crate::routes::schemas::ErrorBody,
         headers(("Retry-After" = u64, description = "whole seconds"))),
        (status = 503, description = "--max-subscribers reached, or shutting down", body = crate::routes::schemas::ErrorBody,
         headers(("Retry-After" = u64, description = "whole seconds, 1 to 5"))),
    )
)]
pub async fn events(
    req: HttpRequest,
    state: web::Data<AppState>,
    access: Access,
) -> Result<HttpResponse, ApiError> {
    let query = EventsQuery::parse(&req)?;
    let filtered = query.filter.len();
    let Open {
        subscription,
        ip_slot,
    } = state
        .service
        .subscribe(&access, peer_ip(&req), query.resume, query.filter)
        .await?;
    let log = ConnectionLog::open(
        "subscriber",
        peer(&req),
        state.metrics.subscribers.clone(),
        format_args!(
            "sub={} resume={:?} filter={}",
            access.subject().unwrap_or("-"),
            query.resume,
            filtered
        ),
    );
    let mut body = EventStream::new(
        subscription,
        state.retry,
        state.keep_alive,
        query.heartbeat,
        log,
    );
    body.ip_slot = ip_slot;
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        // Tells nginx-like proxies not to buffer the stream.
        .insert_header(("x-accel-buffering", "no"))
        .body(body))
}

struct EventsQuery {
    resume: Resume,
    filter: HashSet<TaskId>,
    /// `?heartbeat=1`: keep-alives as named events the client can watch for silence.
    heartbeat: bool,
}

impl EventsQuery {
    fn parse(req: &HttpRequest) -> Result<EventsQuery, ApiError> {
        let mut query_id = None;
        let mut filter = HashSet::new();
        let mut heartbeat = false;
        for (key, value) in form_urlencoded::parse(req.query_string().as_bytes()) {
            match key.as_ref() {
                "last_event_id" => query_id = Some(value.into_owned()),
                "heartbeat" => heartbeat = matches!(value.as_ref(), "1" | "true"),
                "task_id" => {
                    for raw in value.split(',').filter(|s| !s.is_empty()) {
                        let id = TaskId::parse(raw).map_err(|e| {
                            ApiError::BadRequest(format!("task_id filter `{raw}`: {e}"))
                        })?;
                        filter.insert(id);
                    }
                }
                // Unknown parameters (cache busters) are ignored; access_token is read by `Access`.
                _ => {}
            }
        }
        // The header, which browsers send by themselves on reconnect, wins over the query.
        let header_id = req
            .headers()
            .get("last-event-id")
            .map(|v| v.to_str().unwrap_or("\u{fffd}").to_owned());
        let resume = Resume::from_client(header_id.or(query_id).as_deref());
        Ok(EventsQuery {
            resume,
            filter,
            heartbeat,
        })
    }
}

/// The response body. Each event's frame is the hub's shared `Bytes`; only the `retry:` field,
/// keep-alive comments and a rare `reset` are this connection's own.
pub struct EventStream {
    retry: Option<Bytes>,
    /// The first heartbeat, sent right after `retry:` so the client learns the period at once.
    first_heartbeat: Option<Bytes>,
    /// What an idle keep-alive tick sends: a comment, or the heartbeat event when asked for.
    keep_alive_frame: Bytes,
    /// `?heartbeat=1`: control frames also as named events, which an EventSource can see.
    heartbeat: bool,
    subscription: Subscription,
    keep_alive: Interval,
    log: ConnectionLog,
    /// Its place under `--max-subscribers-per-ip`, given back when the body is dropped.
    ip_slot: Option<IpSlot>,
}

impl EventStream {
    fn new(
        subscription: Subscription,
        retry: Duration,
        keep_alive: Duration,
        heartbeat: bool,
        log: ConnectionLog,
    ) -> EventStream {
        let keep_alive_frame = if heartbeat {
            heartbeat_frame(keep_alive)
        } else {
            KEEP_ALIVE_FRAME
        };
        let mut keep_alive = interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
        keep_alive.set_missed_tick_behavior(MissedTickBehavior::Delay);
        EventStream {
            retry: Some(retry_frame(retry)),
            first_heartbeat: heartbeat.then(|| keep_alive_frame.clone()),
            keep_alive_frame,
            heartbeat,
            subscription,
            keep_alive,
            log,
            ip_slot: None,
        }
    }
}

impl MessageBody for EventStream {
    type Error = Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Infallible>>> {
        let this = self.get_mut();
        // The first chunk is ready at once, so the headers go out with it and `onopen` fires
        // before any event exists.
        if let Some(retry) = this.retry.take() {
            return Poll::Ready(Some(Ok(retry)));
        }
        if let Some(heartbeat) = this.first_heartbeat.take() {
            return Poll::Ready(Some(Ok(heartbeat)));
        }
        match this.subscription.poll_next_unpin(cx) {
            Poll::Ready(Some(Delivery::Event(event))) => {
                this.log.events += 1;
                Poll::Ready(Some(Ok(event.frame.clone())))
            }
            Poll::Ready(Some(Delivery::Reset { newest, reason })) => {
                Poll::Ready(Some(Ok(reset_frame(newest, reason.as_str()))))
            }
            Poll::Ready(Some(Delivery::Compacted { since, tasks })) => {
                Poll::Ready(Some(Ok(compacted_frame(since, tasks, this.heartbeat))))
            }
            // Shutdown or token expiry: end after the last complete frame (EventSource then
            // reconnects with its Last-Event-ID, elsewhere or with a new token).
            Poll::Ready(Some(Delivery::End(_)) | None) => Poll::Ready(None),
            // A comment on every tick while idle, so the gap between bytes never exceeds the
            // period; polling only when idle costs a busy stream nothing.
            Poll::Pending => match this.keep_alive.poll_tick(cx) {
                Poll::Ready(_) => Poll::Ready(Some(Ok(this.keep_alive_frame.clone()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

// The stream's own frames: only events (and resets) are encoded once for everyone.

fn retry_frame(retry: std::time::Duration) -> Bytes {
    russe::Event::Retry(retry)
        .into_bytestring()
        .expect("retry always encodes")
        .into_bytes()
}

/// `event: heartbeat` with no id (so a client's last event id stays), for clients that watch for
/// silence: a browser's EventSource never sees comments. `keep_alive_ms` tells it the period.
fn heartbeat_frame(keep_alive: std::time::Duration) -> Bytes {
    let message = russe::Message {
        data: heartbeat_data(keep_alive).into(),
        event: Some("heartbeat".into()),
        id: None,
        retry: None,
    };
    russe::Event::Message(message)
        .into_bytestring()
        .expect("a fixed event name never contains line breaks")
        .into_bytes()
}

fn heartbeat_data(keep_alive: std::time::Duration) -> String {
    format!(
        r#"{{"event":"heartbeat","keep_alive_ms":{}}}"#,
        keep_alive.as_millis()
    )
}

/// Announces a compacted catch-up: the comment `: compacted <n> tasks since <id>` for every
/// reader (curl, proxies' logs), and with `?heartbeat=1` also a named `compacted` event without an
/// id (so the client's last event id stays), because an EventSource never sees comments.
fn compacted_frame(since: EventId, tasks: usize, named: bool) -> Bytes {
    let mut frame = format!(": compacted {tasks} tasks since {since}\n\n");
    if named {
        frame.push_str(&format!(
            "event: compacted\ndata: {{\"event\":\"compacted\",\"since\":\"{since}\",\"tasks\":{tasks}}}\n\n"
        ));
    }
    Bytes::from(frame)
}

const KEEP_ALIVE_FRAME: Bytes = Bytes::from_static(b": keep-alive\n\n");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_and_heartbeat_frames() {
        assert_eq!(
            &retry_frame(Duration::from_millis(3000))[..],
            b"retry: 3000\n\n"
        );
        assert_eq!(
            &heartbeat_frame(Duration::from_secs(15))[..],
            &b"event: heartbeat\ndata: {\"event\":\"heartbeat\",\"keep_alive_ms\":15000}\n\n"[..]
        );
        let since = EventId { epoch: 7, seq: 3 };
        assert_eq!(
            &compacted_frame(since, 2, false)[..],
            b": compacted 2 tasks since 7-3\n\n"
        );
        assert_eq!(
            &compacted_frame(since, 2, true)[..],
            &b": compacted 2 tasks since 7-3\n\nevent: compacted\ndata: {\"event\":\"compacted\",\"since\":\"7-3\",\"tasks\":2}\n\n"[..]
        );
    }
}
