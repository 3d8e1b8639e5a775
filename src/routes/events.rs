//! `GET /events`: a subscription from the hub as a `text/event-stream` of shared, pre-encoded frames.

use crate::app::AppState;
use crate::auth::Access;
use crate::error::ApiError;
use crate::event::{heartbeat_frame, reset_frame, retry_frame, KEEP_ALIVE_FRAME};
use crate::hub::{Delivery, Resume, Subscription};
use crate::limits::IpSlot;
use crate::routes::connection::{peer, ConnectionLog};
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
        (status = 400, description = "an invalid task_id in the filter", body = crate::openapi::ErrorBody),
        (status = 429, description = "over --max-subscribers-per-ip", body = crate::openapi::ErrorBody,
         headers(("Retry-After" = u64, description = "whole seconds"))),
        (status = 503, description = "--max-subscribers reached, or shutting down", body = crate::openapi::ErrorBody,
         headers(("Retry-After" = u64, description = "whole seconds, 1 to 5"))),
    )
)]
pub async fn events(
    req: HttpRequest,
    state: web::Data<AppState>,
    access: Access,
) -> Result<HttpResponse, ApiError> {
    let query = EventsQuery::parse(&req)?;
    let filter = access.task_filter(query.filter)?;
    let ip_slot = state.limits.subscriber_slot(&req)?;
    let subscription = state
        .backend
        .subscribe(query.resume, filter.clone())
        .await?;
    let log = ConnectionLog::open(
        "subscriber",
        peer(&req),
        state.metrics.subscribers.clone(),
        format_args!(
            "sub={} resume={:?} filter={}",
            access.subject().unwrap_or("-"),
            query.resume,
            filter.ids.as_ref().map_or(0, |f| f.len())
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
