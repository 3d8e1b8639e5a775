//! Operations and the page: `/healthz`, `/metrics`, and the task board embedded from `web/dist/`.

use crate::state::AppState;
use actix_web::http::header;
use actix_web::{web, HttpResponse};

/// `200 {"status":"ok"}`, or `503 {"status":"degraded","error":...}` while the store (Redis) is
/// unreachable: load balancers read 503 as "send traffic elsewhere".
#[utoipa::path(get, path = "/healthz", tag = "ops",
    responses(
        (status = 200, description = "alive", body = crate::routes::schemas::Health),
        (status = 503, description = "degraded: the store (Redis) is unreachable", body = crate::routes::schemas::Health),
    ))]
pub async fn healthz(state: web::Data<AppState>) -> HttpResponse {
    match state.service.backend().health().await {
        Ok(()) => HttpResponse::Ok().json(serde_json::json!({ "status": "ok" })),
        Err(error) => HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({ "status": "degraded", "error": error })),
    }
}

#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}

// The built board is committed, so `cargo build` embeds it with no npm step.
const INDEX_HTML: &[u8] = include_bytes!("../../web/dist/index.html");
const APP_JS: &[u8] = include_bytes!("../../web/dist/app.js");
const APP_CSS: &[u8] = include_bytes!("../../web/dist/app.css");

#[utoipa::path(get, path = "/", tag = "ops",
    responses((status = 200, description = "the live task board", content_type = "text/html", body = String)))]
pub async fn index() -> HttpResponse {
    let mut response = page(INDEX_HTML, "text/html; charset=utf-8");
    crate::http_guard::add_page_headers(response.headers_mut());
    response
}

pub async fn app_js() -> HttpResponse {
    page(APP_JS, "text/javascript; charset=utf-8")
}

pub async fn app_css() -> HttpResponse {
    page(APP_CSS, "text/css; charset=utf-8")
}

fn page(body: &'static [u8], content_type: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}
