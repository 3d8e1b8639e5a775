//! The `Access` extractor: the token from the request (header, query or cookie), verified by the
//! configured `Authenticator`; handlers then ask `Access` about each task.

use crate::auth::{Access, Authenticator, Denied, COOKIE_NAME, QUERY_PARAMETER};
use crate::error::ApiError;
use crate::state::AppState;
use actix_web::http::header;
use actix_web::{dev::Payload, web, FromRequest, HttpRequest};
use std::borrow::Cow;
use std::sync::Arc;

/// The request's token, verified: the grant, or why it is refused.
pub fn authenticate(authenticator: &Authenticator, req: &HttpRequest) -> Result<Access, Denied> {
    let token = token_from(req).ok_or_else(|| Denied::Unauthenticated {
        message: format!(
            "a token is required: Authorization: Bearer, the {QUERY_PARAMETER} query parameter or the {COOKIE_NAME} cookie"
        ),
        invalid_token: false,
    })?;
    authenticator
        .verify(&token)
        .map(|grant| Access::Token(Arc::new(grant)))
        .map_err(|message| Denied::Unauthenticated {
            message,
            invalid_token: true,
        })
}

/// The token: `Authorization: Bearer`, else the `access_token` query parameter, else the cookie.
fn token_from(req: &HttpRequest) -> Option<Cow<'_, str>> {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| Cow::Borrowed(token.trim()));
    bearer
        .or_else(|| {
            form_urlencoded::parse(req.query_string().as_bytes())
                .find(|(key, _)| key == QUERY_PARAMETER)
                .map(|(_, token)| Cow::Owned(token.into_owned()))
        })
        .or_else(|| {
            req.headers()
                .get_all(header::COOKIE)
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(name, _)| *name == COOKIE_NAME)
                .map(|(_, token)| Cow::Borrowed(token.trim_matches('"')))
        })
}

impl FromRequest for Access {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Access, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let authenticator = req
            .app_data::<web::Data<AppState>>()
            .and_then(|state| state.auth.clone());
        std::future::ready(match authenticator {
            None => Ok(Access::Open),
            Some(authenticator) => authenticate(&authenticator, req).map_err(ApiError::from),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[test]
    fn the_token_comes_from_header_then_query_then_cookie() {
        let req = TestRequest::get()
            .uri("/events?access_token=q")
            .insert_header(("authorization", "Bearer h"))
            .insert_header(("cookie", "a=1; taskstream_token=c"))
            .to_http_request();
        assert_eq!(token_from(&req).as_deref(), Some("h"));
        let req = TestRequest::get()
            .uri("/events?x=1&access_token=q%2B")
            .insert_header(("authorization", "Basic abc"))
            .insert_header(("cookie", "taskstream_token=c"))
            .to_http_request();
        assert_eq!(token_from(&req).as_deref(), Some("q+"));
        let req = TestRequest::get()
            .uri("/events")
            .insert_header(("cookie", "a=1; taskstream_token=c; b=2"))
            .to_http_request();
        assert_eq!(token_from(&req).as_deref(), Some("c"));
        let req = TestRequest::get().uri("/events").to_http_request();
        assert_eq!(token_from(&req), None);
    }
}
