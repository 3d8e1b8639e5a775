//! `check_ws_origin`: the `/ws` handshake is refused to pages of other sites.
//!
//! CORS does not cover WebSocket handshakes: a browser opens `ws://` to any host from any page,
//! with that host's cookies, and lets the page read every message. With the token in the
//! `taskstream_token` cookie, any site the user visits could read their tasks and publish as them
//! (cross-site WebSocket hijacking, issue 16 item 2). Browsers always send `Origin` on a
//! handshake, so a page is allowed when its origin is this server's own (its authority equals
//! `Host`) or is listed in `--cors-origin`; a client without `Origin` is not a browser page (curl,
//! services, the tests) and has no ambient cookie to abuse, so it is let through.

use crate::error::ApiError;
use actix_web::http::header;
use actix_web::HttpRequest;

/// `--cors-origin`, for the handlers that check `Origin` themselves.
#[derive(Clone, Debug, Default)]
pub struct AllowedOrigins(pub Vec<String>);

/// `Ok` for a request without `Origin`, from this server's own pages, or from a listed origin.
pub fn check_ws_origin(req: &HttpRequest, allowed: &AllowedOrigins) -> Result<(), ApiError> {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return Ok(());
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    match origin.to_str() {
        Ok(origin) if is_allowed(origin, host, &allowed.0) => Ok(()),
        // The page learns nothing from the refusal: a browser shows a refused handshake as 1006.
        _ => Err(ApiError::Forbidden(
            "this Origin may not open /ws: only the server's own pages and --cors-origin may"
                .into(),
        )),
    }
}

/// The scheme is not compared with the connection's: behind a TLS-terminating proxy the server
/// sees plain HTTP while the page is `https://`. The authority is what tells sites apart.
fn is_allowed(origin: &str, host: Option<&str>, listed: &[String]) -> bool {
    if listed.iter().any(|listed| listed == origin) {
        return true;
    }
    let authority = match origin.split_once("://") {
        Some(("http" | "https", authority)) => authority,
        // `null` (sandboxed frames, `file:` pages) and every other scheme.
        _ => return false,
    };
    host.is_some_and(|host| !host.is_empty() && host.eq_ignore_ascii_case(authority))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_and_listed_origins_pass_others_do_not() {
        let listed = ["https://board.example.com".to_owned()];
        let host = Some("127.0.0.1:8080");
        assert!(is_allowed("http://127.0.0.1:8080", host, &listed));
        assert!(is_allowed("https://127.0.0.1:8080", host, &listed));
        assert!(is_allowed(
            "http://LOCALHOST:1",
            Some("localhost:1"),
            &listed
        ));
        assert!(is_allowed("https://board.example.com", host, &listed));
        for foreign in [
            "https://evil.example",
            "null",
            "http://127.0.0.1:8081",
            "http://127.0.0.1",
            "http://127.0.0.1:8080.evil.example",
            "ftp://127.0.0.1:8080",
            "https://board.example.com.evil.example",
            "",
        ] {
            assert!(!is_allowed(foreign, host, &listed), "{foreign}");
        }
        assert!(!is_allowed("http://127.0.0.1:8080", None, &listed));
    }
}
