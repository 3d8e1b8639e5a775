//! --max-subscribers (the hub's capacity): a clear 503 with Retry-After, and the place comes back when one leaves.

use crate::helpers::TestServer;
use reqwest::StatusCode;

#[tokio::test]
async fn more_subscribers_than_the_limit_get_503_with_retry_after() {
    let server = TestServer::start(&["--max-subscribers", "2"]).await;
    let first = server.subscribe("/events").await;
    let _second = server.subscribe("/events").await;
    let refused = server
        .client
        .get(server.url("/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after), "Retry-After {retry_after}");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("too many subscribers"),
        "{body}"
    );
    assert_eq!(
        server.metric("taskstream_rejected_subscribers_total").await,
        1.0
    );
    drop(first);
    server.wait_for_metric("taskstream_subscribers", 1.0).await;
    let _third = server.subscribe("/events").await;
}
