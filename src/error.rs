//! `ApiError`: every failure at the HTTP edge, mapped to its status and `{"error": ...}` in one place.

use crate::auth::Denied;
use crate::backend::BackendError;
use crate::hub::SubscribeError;
use crate::limits::Limited;
use crate::service::Refusal;
use actix_web::body::{to_bytes_limited, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::HeaderValue;
use actix_web::http::{header, StatusCode};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, ResponseError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("Content-Type must be application/json, got {0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method {method} is not allowed here; allowed: {allowed}")]
    MethodNotAllowed {
        method: String,
        allowed: &'static str,
    },
    #[error("{message}")]
    Unavailable {
        message: String,
        retry_after_secs: u64,
    },
    /// No token, or one that is malformed, expired or wrongly signed. `invalid_token` tells a
    /// client with a token that it must get a new one (RFC 6750's `error="invalid_token"`).
    #[error("{message}")]
    Unauthorized {
        message: String,
        invalid_token: bool,
    },
    /// A valid token that does not allow this.
    #[error("{0}")]
    Forbidden(String),
    #[error("{message}")]
    TooManyRequests {
        message: String,
        retry_after_secs: u64,
    },
    #[error("the request head is larger than {0} bytes")]
    HeadersTooLarge(usize),
    #[error("the request body did not arrive within {0} seconds")]
    RequestTimeout(u64),
    /// The store is at `--max-tasks`: the server's limit, not the client's rate, so not a 429.
    #[error("{0}")]
    InsufficientStorage(String),
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        match self {
            ApiError::MethodNotAllowed { allowed, .. } => {
                response.insert_header((header::ALLOW, *allowed));
            }
            ApiError::Unavailable {
                retry_after_secs, ..
            }
            | ApiError::TooManyRequests {
                retry_after_secs, ..
            } => {
                response.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
            }
            ApiError::Unauthorized {
                message,
                invalid_token,
            } => {
                // RFC 6750: no error code when no token was sent; `invalid_token` otherwise. The
                // description never contains the token; it is cut to what a quoted-string in a
                // header may hold, since an invalid header value would turn this into a 500.
                let challenge = if *invalid_token {
                    let description: String = message
                        .chars()
                        .filter(|c| (c.is_ascii_graphic() || *c == ' ') && !matches!(c, '"' | '\\'))
                        .take(200)
                        .collect();
                    format!(
                        r#"Bearer realm="taskstream", error="invalid_token", error_description="{description}""#
                    )
                } else {
                    r#"Bearer realm="taskstream""#.to_owned()
                };
                response.insert_header((header::WWW_AUTHENTICATE, challenge));
            }
            ApiError::Forbidden(_) => {
                response.insert_header((
                    header::WWW_AUTHENTICATE,
                    r#"Bearer realm="taskstream", error="insufficient_scope""#,
                ));
            }
            _ => {}
        }
        response.json(serde_json::json!({ "error": self.to_string() }))
    }
}

impl From<BackendError> for ApiError {
    fn from(error: BackendError) -> ApiError {
        match error {
            BackendError::NotFound(_) => ApiError::NotFound(error.to_string()),
            BackendError::Unavailable(_) => ApiError::Unavailable {
                message: error.to_string(),
                retry_after_secs: 1,
            },
            BackendError::Full(_) => ApiError::InsufficientStorage(error.to_string()),
        }
    }
}

impl From<Denied> for ApiError {
    fn from(denied: Denied) -> ApiError {
        match denied {
            Denied::Unauthenticated {
                message,
                invalid_token,
            } => ApiError::Unauthorized {
                message,
                invalid_token,
            },
            Denied::Forbidden(message) => ApiError::Forbidden(message),
        }
    }
}

impl From<Limited> for ApiError {
    fn from(limited: Limited) -> ApiError {
        ApiError::TooManyRequests {
            message: limited.message,
            retry_after_secs: limited.retry_after_secs,
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> ApiError {
        match refusal {
            Refusal::BadInput(message) => ApiError::BadRequest(message),
            Refusal::TooLarge(max) => ApiError::PayloadTooLarge(max),
            Refusal::Denied(denied) => denied.into(),
            Refusal::Limited(limited) => limited.into(),
            Refusal::Store(error) => error.into(),
            Refusal::Subscribe(error) => error.into(),
        }
    }
}

impl From<SubscribeError> for ApiError {
    fn from(error: SubscribeError) -> ApiError {
        let retry_after_secs = match error {
            SubscribeError::Full(_) => spread_retry_after(),
            SubscribeError::Closed => 1,
        };
        ApiError::Unavailable {
            message: error.to_string(),
            retry_after_secs,
        }
    }
}

/// Retry-After between 1 and 5 s, spread so refused clients do not all come back at once.
fn spread_retry_after() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    1 + u64::from(nanos % 5)
}

/// Errors answered by middleware rather than by us (actix-cors refusing a preflight from an
/// origin it does not know) are plain text; this gives them the same `{"error": ...}` shape.
pub async fn json_errors(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let response = next.call(req).await?;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return Ok(response.map_into_left_body());
    }
    let (req, response) = response.into_parts();
    let (response, body) = response.into_parts();
    // Such bodies are one sentence; anything longer is not worth holding.
    let text = match to_bytes_limited(body, 1024).await {
        Ok(Ok(bytes)) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        _ => String::new(),
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let mut response = response.set_body(serde_json::json!({ "error": message }).to_string());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(ServiceResponse::new(req, response).map_into_right_body())
}
