//! The OpenAPI document, generated from the handlers' `#[utoipa::path]` annotations and the types'
//! schemas; served at `/openapi.json` and committed as docs/openapi.json (a test keeps them equal).

use crate::routes::schemas::{Accepted, Deleted, ErrorBody, Health, Snapshot, UpdateTask};
use crate::routes::{events, ops, tasks, ws};
use crate::task::{Task, TaskId};
use actix_web::HttpResponse;
use std::sync::OnceLock;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, RefOr, SecurityRequirement};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "taskstream",
        description = "Real-time task notifications over Server-Sent Events. Authentication is off unless the server runs with --jwt-secret or --jwt-public-key; then every operation marked with a security requirement needs a JWT (docs/security.md).",
        license(name = "MIT", identifier = "MIT")
    ),
    paths(
        tasks::update_task,
        tasks::list_tasks,
        tasks::get_task,
        tasks::delete_task,
        events::events,
        ws::ws,
        ops::healthz,
        ops::metrics,
        openapi_json,
        ops::index,
    ),
    components(schemas(UpdateTask, Accepted, Deleted, Snapshot, ErrorBody, Health, Task, TaskId)),
    modifiers(&Protection),
    tags(
        (name = "tasks", description = "Create, read, update and delete tasks"),
        (name = "events", description = "The Server-Sent Events stream"),
        (name = "ops", description = "Health, metrics, this document and the board page"),
    )
)]
pub struct ApiDoc;

/// The operations open even with auth on; every other one takes a token.
const OPEN_PATHS: [&str; 4] = ["/healthz", "/metrics", "/openapi.json", "/"];

/// Adds what every operation shares, once, instead of on each annotation: the security schemes,
/// the 401/403 of protected operations, and the 431 any request can get.
struct Protection;

impl Modify for Protection {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "access_token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::new(
                crate::auth::QUERY_PARAMETER,
            ))),
        );
        components.add_security_scheme(
            "cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(crate::auth::COOKIE_NAME))),
        );
        let error = |description: &str| -> RefOr<utoipa::openapi::Response> {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    Content::new(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                        "ErrorBody",
                    )))),
                )
                .into()
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            let protected = !OPEN_PATHS.contains(&path.as_str());
            for operation in [
                &mut item.get,
                &mut item.post,
                &mut item.delete,
                &mut item.put,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                let responses = &mut operation.responses.responses;
                responses.insert(
                    "431".into(),
                    error("the request head is larger than --max-header-bytes"),
                );
                if protected {
                    responses.insert(
                        "401".into(),
                        error("no token, or a malformed, expired or wrongly signed one (only with auth on); WWW-Authenticate says which"),
                    );
                    responses.insert("403".into(), error("the token does not allow this"));
                    // `{}` first: with auth off (the default) no token is needed.
                    operation.security = Some(vec![
                        SecurityRequirement::default(),
                        SecurityRequirement::new("bearer", Vec::<String>::new()),
                        SecurityRequirement::new("access_token", Vec::<String>::new()),
                        SecurityRequirement::new("cookie", Vec::<String>::new()),
                    ]);
                }
            }
        }
    }
}

/// The document as served, generated once.
pub fn document() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        // Serialising a document built from our own types cannot fail.
        let mut json = ApiDoc::openapi()
            .to_pretty_json()
            .expect("the OpenAPI document serialises");
        json.push('\n');
        json
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/openapi.json is what the code generates. To refresh it after changing an annotation:
    /// `UPDATE_OPENAPI=1 cargo test openapi`.
    #[test]
    fn the_committed_document_is_what_the_code_generates() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(path, document()).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == document(),
            "docs/openapi.json differs from the generated document: run `UPDATE_OPENAPI=1 cargo test openapi` and commit it"
        );
    }

    #[test]
    fn every_route_is_documented_and_protected_ones_say_so() {
        let doc: serde_json::Value = serde_json::from_str(document()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for path in ["/update_task", "/tasks", "/tasks/{task_id}", "/events"] {
            let item = paths[path].as_object().unwrap();
            for operation in item.values() {
                assert!(operation["responses"]["401"].is_object(), "{path}");
                assert_eq!(operation["security"][0], serde_json::json!({}), "{path}");
            }
        }
        assert!(paths["/healthz"]["get"]["security"].is_null());
    }
}

#[utoipa::path(get, path = "/openapi.json", tag = "ops",
    responses((status = 200, description = "this document", content_type = "application/json", body = Object)))]
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(document())
}
