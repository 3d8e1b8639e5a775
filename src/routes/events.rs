//! `GET /events`: a subscription from the hub as a `text/event-stream` of shared, pre-encoded frames.

use crate::app::AppState;
use crate::error::ApiError;
use crate::event::{reset_frame, retry_frame, KEEP_ALIVE_FRAME};
use crate::hub::{Delivery, Resume, Subscription, TaskFilter};
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
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{interval_at, Interval, MissedTickBehavior};

pub async fn events(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let query = EventsQuery::parse(&req)?;
    let subscription = state
        .backend
        .subscribe(query.resume, query.filter.clone())
        .await?;
    let log = ConnectionLog::open(
        "subscriber",
        peer(&req),
        state.metrics.subscribers.clone(),
        format_args!(
            "resume={:?} filter={}",
            query.resume,
            query.filter.as_ref().map_or(0, |f| f.len())
        ),
    );
    let body = EventStream::new(subscription, state.retry, state.keep_alive, log);
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        // Tells nginx-like proxies not to buffer the stream.
        .insert_header(("x-accel-buffering", "no"))
        .body(body))
}

struct EventsQuery {
    resume: Resume,
    filter: TaskFilter,
}

impl EventsQuery {
    fn parse(req: &HttpRequest) -> Result<EventsQuery, ApiError> {
        let mut query_id = None;
        let mut filter = HashSet::new();
        for (key, value) in form_urlencoded::parse(req.query_string().as_bytes()) {
            match key.as_ref() {
                "last_event_id" => query_id = Some(value.into_owned()),
                "task_id" => {
                    for raw in value.split(',').filter(|s| !s.is_empty()) {
                        let id = TaskId::parse(raw).map_err(|e| {
                            ApiError::BadRequest(format!("task_id filter `{raw}`: {e}"))
                        })?;
                        filter.insert(id);
                    }
                }
                // Unknown parameters (cache busters, access_token for proxies) are ignored.
                _ => {}
            }
        }
        // The header, which browsers send by themselves on reconnect, wins over the query.
        let header_id = req
            .headers()
            .get("last-event-id")
            .map(|v| v.to_str().unwrap_or("\u{fffd}").to_owned());
        let resume = Resume::from_client(header_id.or(query_id).as_deref());
        let filter = (!filter.is_empty()).then(|| Arc::new(filter));
        Ok(EventsQuery { resume, filter })
    }
}

/// The response body. Each event's frame is the hub's shared `Bytes`; only the `retry:` field,
/// keep-alive comments and a rare `reset` are this connection's own.
pub struct EventStream {
    retry: Option<Bytes>,
    subscription: Subscription,
    keep_alive: Interval,
    log: ConnectionLog,
}

impl EventStream {
    fn new(
        subscription: Subscription,
        retry: Duration,
        keep_alive: Duration,
        log: ConnectionLog,
    ) -> EventStream {
        let mut keep_alive = interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
        keep_alive.set_missed_tick_behavior(MissedTickBehavior::Delay);
        EventStream {
            retry: Some(retry_frame(retry)),
            subscription,
            keep_alive,
            log,
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
        match this.subscription.poll_next_unpin(cx) {
            Poll::Ready(Some(Delivery::Event(event))) => {
                this.log.events += 1;
                Poll::Ready(Some(Ok(event.frame.clone())))
            }
            Poll::Ready(Some(Delivery::Reset { newest, reason })) => {
                Poll::Ready(Some(Ok(reset_frame(newest, reason.as_str()))))
            }
            // The hub closed (shutdown): end after the last complete frame.
            Poll::Ready(None) => Poll::Ready(None),
            // A comment on every tick while idle, so the gap between bytes never exceeds the
            // period; polling only when idle costs a busy stream nothing.
            Poll::Pending => match this.keep_alive.poll_tick(cx) {
                Poll::Ready(_) => Poll::Ready(Some(Ok(KEEP_ALIVE_FRAME))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}
