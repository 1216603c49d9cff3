//! What a hostile or broken client can send below the JSON: cut-off bodies,
//! trickling bodies, made-up methods, odd admin queries. None of it may store
//! anything, get a 500, or grow the service without bound.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;

/// Sends raw bytes, optionally half-closes, and returns the first response.
fn raw_exchange(port: u16, request: &[u8], half_close: bool) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    s.write_all(request).expect("send");
    if half_close {
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
    }
    let mut buf = vec![0; 8192];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn order_body(customer: &str) -> String {
    order_of(customer).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_is_refused_and_stores_nothing() {
    let (db, names) = (TestDb::create().await, Names::new());
    let app = TestApp::ready(base_env(&db.url(), &names)).await;
    let port = app.port;

    let body = order_body("cut-by-length");
    let short_by_length = format!(
        "POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len() + 100
    );
    let body2 = order_body("cut-by-chunks");
    let missing_last_chunk = format!(
        "POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body2}\r\n",
        body2.len()
    );
    let body3 = order_body("with-trailer");
    let with_trailer = format!(
        "POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body3}\r\n0\r\nX-Trailer: 1\r\n\r\n",
        body3.len()
    );

    let (a, b, c) = tokio::task::spawn_blocking(move || {
        (
            raw_exchange(port, short_by_length.as_bytes(), true),
            raw_exchange(port, missing_last_chunk.as_bytes(), true),
            raw_exchange(port, with_trailer.as_bytes(), false),
        )
    })
    .await
    .expect("raw requests");

    assert_eq!(status_of(&a), 400, "{a}");
    assert!(a.contains("malformed_json"), "{a}");
    assert_eq!(status_of(&b), 400, "{b}");
    assert_eq!(
        status_of(&c),
        201,
        "a chunked body with trailer fields is complete: {c}"
    );
    let stored: Vec<String> = db
        .client()
        .await
        .query("SELECT customer_id FROM orders", &[])
        .await
        .expect("orders")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        stored,
        vec!["with-trailer".to_owned()],
        "only the complete body is an order"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_trickles_in_too_slowly_is_refused_with_408() {
    let (db, names) = (TestDb::create().await, Names::new());
    let app = TestApp::ready(base_env(&db.url(), &names)).await;
    let port = app.port;
    let body = order_body("too-slow");

    let (response, took) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let head = format!(
            "POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).expect("send");
        s.write_all(&body.as_bytes()[..10]).expect("send"); // and then nothing
        let started = Instant::now();
        let mut buf = vec![0; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        (String::from_utf8_lossy(&buf[..n]).into_owned(), started.elapsed())
    })
    .await
    .expect("raw request");

    assert_eq!(status_of(&response), 408, "{response}");
    assert!(response.contains("request_timeout"), "{response}");
    assert!(took < Duration::from_secs(15), "refused after {took:?}");
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn made_up_methods_do_not_grow_the_metrics_and_head_works_where_get_does() {
    let (db, names) = (TestDb::create().await, Names::new());
    let app = TestApp::ready(base_env(&db.url(), &names)).await;
    let c = &app.client;

    for i in 0..50 {
        let method = reqwest::Method::from_bytes(format!("MADEUP{i}").as_bytes()).expect("method");
        let r = c
            .http
            .request(method, c.url("/orders"))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 405);
    }
    let text = c.metrics().await;
    assert!(
        !text.contains("MADEUP"),
        "a client's method names became metric labels"
    );
    assert!(text.contains(r#"method="other""#), "{text}");

    for path in ["/health/live", "/health/ready", "/metrics", "/openapi.json"] {
        let r = c.http.head(c.url(path)).send().await.expect("HEAD");
        assert_eq!(r.status(), 200, "HEAD {path}");
    }
    let r = c
        .http
        .delete(c.url("/health/live"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(r.headers()["allow"], "GET, HEAD");
    app.stop().await;
}

#[tokio::test]
async fn admin_queries_out_of_range_are_422_and_the_bearer_scheme_is_case_insensitive() {
    let (db, names) = (TestDb::create().await, Names::new());
    let mut env = base_env(&db.url(), &names);
    env.insert("ADMIN_TOKEN".into(), "s3cret".into());
    let app = TestApp::ready(env).await;
    let c = &app.client;
    let nil = uuid::Uuid::nil();

    for auth in ["Bearer s3cret", "bearer s3cret", "BEARER s3cret"] {
        let r = c
            .http
            .get(c.url("/outbox"))
            .header("authorization", auth)
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 200, "{auth}");
    }
    for auth in ["Bearer wrong", "Basic s3cret", "s3cret", "Bearer"] {
        let r = c
            .http
            .get(c.url("/outbox"))
            .header("authorization", auth)
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 401, "{auth}");
    }
    for query in [
        format!("after=-211000000000000000_{nil}"),
        format!("after=999999999999999999_{nil}"),
        "after=garbage".into(),
        "limit=0".into(),
        "limit=501".into(),
        "limit=abc".into(),
        "colour=red".into(),
    ] {
        let r = c
            .http
            .get(c.url(&format!("/outbox/dead?{query}")))
            .header("authorization", "Bearer s3cret")
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 422, "{query}");
        assert_eq!(
            r.json::<Value>().await.expect("json")["error"]["code"],
            "validation_failed",
            "{query}"
        );
    }
    app.stop().await;
}
