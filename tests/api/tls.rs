//! HTTPS with `--tls-cert`/`--tls-key`: an SSE stream over HTTP/2 (ALPN h2), and HTTP/1.1 on the
//! same port, with a self-signed certificate made by the test.

use crate::helpers::{temp_dir, SseStream, TestServer};
use reqwest::{StatusCode, Version};
use serde_json::json;
use std::sync::Arc;

struct Tls {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    /// A client that trusts only this certificate.
    roots: rustls::RootCertStore,
}

fn self_signed() -> Tls {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let dir = temp_dir();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    Tls { cert, key, roots }
}

fn client(tls: &Tls, alpn: &[&[u8]]) -> reqwest::Client {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(tls.roots.clone())
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .build()
        .unwrap()
}

async fn tls_server(tls: &Tls) -> TestServer {
    TestServer::start(&[
        "--tls-cert",
        tls.cert.to_str().unwrap(),
        "--tls-key",
        tls.key.to_str().unwrap(),
    ])
    .await
}

#[tokio::test]
async fn an_event_stream_over_http2_with_tls() {
    let tls = self_signed();
    let server = tls_server(&tls).await;
    assert!(
        server.base.starts_with("https://127.0.0.1:"),
        "{}",
        server.base
    );
    let client = client(&tls, &[b"h2", b"http/1.1"]);
    let response = client.get(server.url("/events")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_2, "ALPN chose h2");
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert!(
        response.headers().get("connection").is_none(),
        "forbidden in HTTP/2"
    );
    let mut stream = SseStream::new(response);
    assert_eq!(stream.next_frame().await.unwrap().raw, "retry: 3000\n\n");
    // The publish shares the HTTP/2 connection with the open stream.
    let answer = client
        .post(server.url("/update_task"))
        .json(&json!({"task_id": 101, "status": "done"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.version(), Version::HTTP_2);
    assert_eq!(answer.status(), StatusCode::ACCEPTED);
    let event = stream.next_event().await;
    assert_eq!(event.event.as_deref(), Some("task_updated"));
    assert_eq!(event.json()["status"], "done");
}

/// Also: over TLS every answer carries HSTS (actix-web-lab's middleware), so a browser that once
/// reached the server over HTTPS keeps to it; a plain HTTP server sends none.
#[tokio::test]
async fn http1_clients_still_get_http1_over_tls() {
    let tls = self_signed();
    let server = tls_server(&tls).await;
    let response = client(&tls, &[b"http/1.1"])
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), Version::HTTP_11);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["strict-transport-security"],
        "max-age=31536000"
    );
    let plain = TestServer::start(&[]).await;
    let response = plain
        .client
        .get(plain.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert!(response
        .headers()
        .get("strict-transport-security")
        .is_none());
}

#[tokio::test]
async fn a_bad_certificate_stops_the_server_before_it_listens() {
    let dir = temp_dir();
    let cert = dir.join("cert.pem");
    std::fs::write(&cert, "not a certificate").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_taskstream"))
        .args([
            "--bind",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            cert.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(!String::from_utf8_lossy(&output.stdout).contains("listening"));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cert.pem"));
}
