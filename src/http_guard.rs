//! The HTTP/1 edge below the handlers: a request body left unread ends its connection
//! (`close_unfinished_bodies`), and the board page's security headers (`add_page_headers`).
//!
//! actix-http 3.20 (the newest release) drains a chunked body that a handler dropped unread, with
//! no time or byte bound, and only then lets the connection go: a client that never sends the
//! last chunk held its socket for good, past `--request-timeout` (issue 16, item 1; upstream
//! actix/actix-web#3936 added that drain and agrees it should be bounded). For a body that is
//! still referenced when the answer is written, actix does the safe thing instead: it marks the
//! answer `connection: close` and shuts the socket once the answer is out (without a linger, as
//! `client_disconnect_timeout` is zero). So this middleware keeps the request body alive until
//! the answer's body has been sent; a body read to its end changes nothing, keep-alive included.
//!
//! Such an answer says `connection: close`, but actix still serves requests the client had
//! already pipelined behind it (RFC 9112 9.6 forbids that: issue 16, item 12). So the connection
//! remembers the close, and a request arriving behind it is never answered: it waits until the
//! close answer is written, then gets a body that fails before its head is sent, which is the one
//! way a service can make actix drop a connection without writing anything more on it.

use actix_web::body::{BodySize, EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::web::Bytes;
use actix_web::HttpMessage;
use futures_util::Stream;
use std::cell::{Cell, RefCell};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

/// The HTTP/1 body, shared by the handler (which reads it) and the answer (which outlives it).
type Shared = Rc<RefCell<Payload>>;

/// Per connection (`HttpServer::on_connect`): set once an answer on it will close it.
#[derive(Clone, Default)]
pub struct Closing(Rc<Cell<bool>>);

/// For `HttpServer::on_connect`.
pub fn on_connect(_: &dyn std::any::Any, extensions: &mut actix_web::dev::Extensions) {
    extensions.insert(Closing::default());
}

/// How long a request pipelined behind a closing answer waits before its connection is dropped:
/// actix writes the closing answer out while this request's handler is pending, and a reader that
/// keeps up has it within this time.
const PIPELINED_AFTER_CLOSE: Duration = Duration::from_millis(200);

pub async fn close_unfinished_bodies(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let closing = req.conn_data::<Closing>().cloned();
    if closing.as_ref().is_some_and(|c| c.0.get()) {
        tokio::time::sleep(PIPELINED_AFTER_CLOSE).await;
        let response = req.into_response(actix_web::HttpResponse::BadRequest().finish());
        return Ok(response.map_body(|_, _| EitherBody::left(DropConnection)));
    }
    // Only HTTP/1 drains: HTTP/2 resets the stream instead, and a bodiless request has nothing.
    let held = match req.take_payload() {
        payload @ Payload::H1 { .. } => {
            let shared: Shared = Rc::new(RefCell::new(payload));
            req.set_payload(Payload::Stream {
                payload: Box::pin(SharedBody(shared.clone())),
            });
            Some(shared)
        }
        other => {
            req.set_payload(other);
            None
        }
    };
    let response = next.call(req).await?;
    if let (Some(held), Some(closing)) = (&held, &closing) {
        // An upgraded connection goes on reading its body (the WebSocket frames) elsewhere.
        if response.status() != StatusCode::SWITCHING_PROTOCOLS && body_unfinished(held).await {
            closing.0.set(true);
        }
    }
    Ok(response.map_body(|_, body| EitherBody::right(HoldBody { body, _held: held })))
}

/// Whether the client has not yet sent all of the body: what actix closes the connection for.
/// What did arrive is read and dropped (the handler has answered without it).
async fn body_unfinished(held: &Shared) -> bool {
    std::future::poll_fn(|cx| loop {
        match Pin::new(&mut *held.borrow_mut()).poll_next(cx) {
            Poll::Ready(Some(Ok(_))) => continue,
            Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(false),
            Poll::Pending => return Poll::Ready(true),
        }
    })
    .await
}

/// The handler's view of the shared body. The handler runs on the connection's thread, and the
/// borrow lasts one poll, so it never overlaps another.
struct SharedBody(Shared);

impl Stream for SharedBody {
    type Item = Result<Bytes, actix_web::error::PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_next(cx)
    }
}

pin_project_lite::pin_project! {
    /// The answer's body, holding the request body until actix has decided about the connection
    /// (it does so while the answer's body still exists).
    pub struct HoldBody<B> {
        #[pin]
        body: B,
        _held: Option<Shared>,
    }
}

impl<B: MessageBody> MessageBody for HoldBody<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        self.project().body.poll_next(cx)
    }
}

/// The board page's own policy: its script, style and connections come from this server only,
/// no other site may frame it (its form publishes as the user: clickjacking), and its URL, which
/// may carry `?token=`, is never sent as a referrer. `data:` images: the page's empty favicon.
pub const PAGE_CSP: &str = "default-src 'self'; img-src 'self' data:; object-src 'none'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub fn add_page_headers(headers: &mut actix_web::http::header::HeaderMap) {
    use actix_web::http::header::{self, HeaderValue};
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PAGE_CSP),
    );
    // For browsers without CSP level 2's frame-ancestors.
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// The body of a request pipelined behind a `connection: close` answer: it fails at once, and
/// actix then drops the connection with this answer's head still unwritten.
struct DropConnection;

#[derive(Debug, thiserror::Error)]
#[error("a request was pipelined behind a `connection: close` answer: the connection is dropped without answering it")]
struct PipelinedAfterClose;

impl MessageBody for DropConnection {
    type Error = PipelinedAfterClose;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Poll::Ready(Some(Err(PipelinedAfterClose)))
    }
}
