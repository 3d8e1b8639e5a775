//! `close_unfinished_bodies`: a request body the handler left unread ends its connection.
//!
//! actix-http 3.20 (the newest release) drains a chunked body that a handler dropped unread, with
//! no time or byte bound, and only then lets the connection go: a client that never sends the
//! last chunk held its socket for good, past `--request-timeout` (issue 16, item 1; upstream
//! actix/actix-web#3936 added that drain and agrees it should be bounded). For a body that is
//! still referenced when the answer is written, actix does the safe thing instead: it marks the
//! answer `connection: close` and shuts the socket once the answer is out (without a linger, as
//! `client_disconnect_timeout` is zero). So this middleware keeps the request body alive until
//! the answer's body has been sent; a body read to its end changes nothing, keep-alive included.

use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::web::Bytes;
use actix_web::HttpMessage;
use futures_util::Stream;
use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

/// The HTTP/1 body, shared by the handler (which reads it) and the answer (which outlives it).
type Shared = Rc<RefCell<Payload>>;

pub async fn close_unfinished_bodies(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
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
    Ok(response.map_body(|_, body| HoldBody { body, _held: held }))
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
