//! The application: the one route table, and `run` (serve until a shutdown future resolves, then
//! stop every stream and background task).

use crate::config::Config;
use crate::error::ApiError;
use crate::lifecycle::Lifecycle;
use crate::middleware;
use crate::routes::{events, ops, tasks, ws};
use crate::state::AppState;
use crate::tls;
use actix_web::dev::{Service, ServiceRequest};
use actix_web::middleware::{from_fn, Condition, Logger};
use actix_web::{guard, web, App, HttpRequest, HttpServer};
use actix_web_lab::header::StrictTransportSecurity;
use actix_web_lab::middleware::RedirectHttps;
use futures_util::FutureExt;
use log::{info, warn};
use std::future::Future;
use std::net::TcpListener;
use std::time::Duration;

/// Every route. A known path with a wrong method answers 405 naming the allowed ones.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(only(
        "/update_task",
        "POST",
        web::post().to(tasks::update_task),
    ))
    .service(only("/tasks", "GET", web::get().to(tasks::list_tasks)))
    .service(
        web::resource("/tasks/{task_id}")
            .route(web::get().to(tasks::get_task))
            .route(web::delete().to(tasks::delete_task))
            .default_service(web::to(method_not_allowed("GET, DELETE"))),
    )
    .service(only("/events", "GET", web::get().to(events::events)))
    .service(only("/ws", "GET", web::get().to(ws::ws)))
    .service(only(
        "/healthz",
        "GET, HEAD",
        get_or_head().to(ops::healthz),
    ))
    .service(only(
        "/metrics",
        "GET, HEAD",
        get_or_head().to(ops::metrics),
    ))
    .service(only("/", "GET, HEAD", get_or_head().to(ops::index)))
    .service(only("/app.js", "GET, HEAD", get_or_head().to(ops::app_js)))
    .service(only(
        "/app.css",
        "GET, HEAD",
        get_or_head().to(ops::app_css),
    ))
    .service(only(
        "/openapi.json",
        "GET, HEAD",
        get_or_head().to(crate::openapi::openapi_json),
    ));
}

/// For the page and the probes, which `curl -I` and load balancers ask with HEAD (actix sends
/// the headers of the GET answer without its body).
fn get_or_head() -> actix_web::Route {
    web::route().guard(guard::Any(guard::Get()).or(guard::Head()))
}

/// A path served by the methods of `route` only.
fn only(path: &str, allowed: &'static str, route: actix_web::Route) -> actix_web::Resource {
    web::resource(path)
        .route(route)
        .default_service(web::to(method_not_allowed(allowed)))
}

fn method_not_allowed(
    allowed: &'static str,
) -> impl Fn(HttpRequest) -> std::future::Ready<Result<actix_web::HttpResponse, ApiError>> + Clone {
    move |req: HttpRequest| {
        std::future::ready(Err(ApiError::MethodNotAllowed {
            method: req.method().to_string(),
            allowed,
        }))
    }
}

async fn not_found(req: HttpRequest) -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.path()
    )))
}

/// The request line for the access log, with the value of every credential-bearing query
/// parameter and every JWT-shaped text replaced, so tokens never reach the logs.
fn redacted_request_line(req: &ServiceRequest) -> String {
    let query = req.query_string();
    let target = if query.is_empty() {
        req.path().to_owned()
    } else {
        let redacted = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if crate::log_redact::is_credential_parameter(key) => {
                    format!("{key}=[redacted]")
                }
                _ => pair.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("&");
        format!("{}?{redacted}", req.path())
    };
    let target = crate::log_redact::redact_jwts(&target);
    format!("{} {target} {:?}", req.method(), req.version())
}

/// Sets the calling thread's nice value; refused (below 0 without CAP_SYS_NICE), the thread runs
/// on at the default, as nginx does with a worker_priority it cannot have.
fn set_worker_nice(nice: i32) {
    // SAFETY: plain syscalls on this thread's own id, no memory passed.
    let tid = unsafe { libc::gettid() } as libc::id_t;
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } == 0 {
        info!("publish worker at nice {nice}");
    } else {
        warn!(
            "cannot set the publish worker's nice to {nice}: {} (below 0 it needs CAP_SYS_NICE \
             or LimitNICE); it runs at the default",
            std::io::Error::last_os_error()
        );
    }
}

/// Serves until `shutdown` resolves, then ends every event stream after its last complete frame,
/// stops accepting, and returns once connections are closed (at most `--shutdown-timeout` later).
pub async fn run(
    listener: TcpListener,
    publish_listener: Option<TcpListener>,
    config: Config,
    shutdown: impl Future<Output = ()> + 'static,
) -> std::io::Result<()> {
    let tls = tls::server_config(&config)?;
    let lifecycle = Lifecycle::new();
    let state = web::Data::new(AppState::new(&config, &lifecycle)?);
    state.service.backend().started().await;
    {
        let state = state.clone();
        let stopping = lifecycle.stopping();
        lifecycle.spawn("store", async move {
            stopping.cancelled().await;
            state.service.backend().stopped().await;
        });
    }
    // Before the server takes its first publish, so a worker starting live misses nothing.
    crate::webhook::start(state.clone().into_inner(), &config, &lifecycle).await?;
    let app_state = state.clone();
    let cors_origins = config.cors_origin.clone();
    let hsts = tls.is_some();
    let allowed_origins = web::Data::new(crate::origin::AllowedOrigins(cors_origins.clone()));
    let app = move || {
        let metrics = app_state.metrics.clone();
        App::new()
            .app_data(app_state.clone())
            .wrap(from_fn(middleware::limit_headers))
            // Served over TLS only: tell browsers to keep to HTTPS (a year; subdomains are not
            // taskstream's to speak for).
            .wrap(Condition::new(
                hsts,
                RedirectHttps::with_hsts(StrictTransportSecurity::new(Duration::from_secs(
                    365 * 86_400,
                ))),
            ))
            .app_data(allowed_origins.clone())
            .wrap(Condition::new(
                !cors_origins.is_empty(),
                middleware::cors(&cors_origins),
            ))
            .wrap(from_fn(crate::error::json_errors))
            .wrap_fn(move |req, srv| {
                let metrics = metrics.clone();
                srv.call(req).map(move |result| {
                    if let Ok(response) = &result {
                        metrics
                            .http_requests
                            .with_label_values(&[response.status().as_str()])
                            .inc();
                    }
                    result
                })
            })
            // `%r` would log the query string, and with it an `access_token`.
            .wrap(
                Logger::new(r#"%a "%{request}xi" %s %b %Dms"#)
                    .custom_request_replace("request", redacted_request_line),
            )
            .wrap(from_fn(crate::http_guard::close_unfinished_bodies))
            .configure(routes)
            .default_service(web::to(not_found))
    };
    let serve =
        |workers: Option<usize>, listener, tls: Option<rustls::ServerConfig>, nice: Option<i32>| {
            let app = app.clone();
            // actix builds the app on each worker's own thread, so this is where that thread is.
            let server = HttpServer::new(move || {
                if let Some(nice) = nice {
                    set_worker_nice(nice);
                }
                app()
            })
            // A subscriber that goes away only shows as EOF on the read side; without this actix
            // keeps the idle stream (and its subscription) until a write fails, up to a
            // keep-alive later. EventSource and curl never half-close, so nothing legitimate is
            // cut.
            .h1_allow_half_closed(false)
            .on_connect(crate::http_guard::on_connect)
            // Slow-loris: a client gets this long for the request head (and for a TLS
            // handshake); the body has its own timeout in the handler.
            .client_request_timeout(config.request_timeout())
            .tls_handshake_timeout(config.request_timeout())
            // No linger after a response whose request body was not read to its end. actix would
            // keep reading such a connection for up to this long before closing it, and an
            // upgraded WebSocket is always such a connection: after the close handshake the
            // client waits for the server to close TCP (RFC 6455 7.1.1), so every close took the
            // whole linger (about 0.9 s).
            .client_disconnect_timeout(Duration::ZERO)
            .disable_signals()
            .shutdown_timeout(config.shutdown_timeout)
            // A reconnect storm of thousands of clients must not overflow the accept queue.
            .backlog(8192)
            // actix keeps a connection's write buffer at the largest size it reached (up to 128
            // KiB), and a replay fills it to this threshold before flushing: with actix's 32 KiB,
            // every stream that ever replayed kept about 40 KiB after a reconnect storm.
            .h1_write_buffer_size(8 * 1024);
            let server = match workers {
                Some(workers) => server.workers(workers),
                None => server,
            };
            Ok::<_, std::io::Error>(
                match tls {
                    Some(tls) => server.listen_rustls_0_23(listener, tls)?,
                    None => server.listen(listener)?,
                }
                .run(),
            )
        };
    // Its own worker: a publish there is read and answered by a thread that writes no stream,
    // so it does not wait its turn behind thousands of subscribers woken by the last event.
    let publish_server = match publish_listener {
        Some(listener) => Some(serve(
            Some(1),
            listener,
            tls.clone(),
            config.publish_priority,
        )?),
        None => None,
    };
    let main_server = serve(config.workers.map(usize::from), listener, tls, None)?;
    let handles: Vec<_> = std::iter::once(main_server.handle())
        .chain(publish_server.as_ref().map(|s| s.handle()))
        .collect();
    actix_web::rt::spawn(async move {
        shutdown.await;
        state.hub().close();
        futures_util::future::join_all(handles.iter().map(|h| h.stop(true))).await;
    });
    match publish_server {
        Some(publish_server) => {
            let (main, publish) = futures_util::future::join(main_server, publish_server).await;
            main.and(publish)?;
        }
        None => main_server.await?,
    }
    lifecycle
        .stop(Duration::from_secs(config.shutdown_timeout.max(2)))
        .await;
    info!("stopped");
    Ok(())
}
