//! The HTTP contract of SPEC §2, apart from body validation.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn an_order_placed_over_http_arrives_on_the_queue_with_the_spec_shape() {
    // Arrange
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let app = TestApp::ready(base_env(&db.url(), &names)).await;

    // Act
    let r = app
        .client
        .post_order_with(&good_order(), &[("X-Correlation-ID", "corr-abc-1")])
        .await;

    // Assert: the answer
    assert_eq!(r.status(), 201);
    let location = r.headers()["location"].to_str().expect("ascii").to_owned();
    assert_eq!(r.headers()["x-correlation-id"], "corr-abc-1");
    let order: Value = r.json().await.expect("json");
    let id = order["id"].as_str().expect("id").to_owned();
    assert_eq!(location, format!("/orders/{id}"));
    assert_eq!(order["status"], "accepted");
    assert_eq!(order["total_cents"], 2500);
    assert_eq!(order["correlation_id"], "corr-abc-1");
    chrono::DateTime::parse_from_rfc3339(order["created_at"].as_str().expect("created_at"))
        .expect("RFC 3339");

    // Assert: the message
    spy.wait_for_orders(std::slice::from_ref(&id), Duration::from_secs(10))
        .await;
    let m = &spy.messages()[0];
    assert_eq!(m.routing_key, "order.created");
    let p = &m.properties;
    let message_id = m.message_id();
    uuid::Uuid::parse_str(&message_id).expect("message_id is a UUID");
    assert_eq!(
        p.correlation_id().as_ref().map(|c| c.as_str()),
        Some("corr-abc-1")
    );
    assert_eq!(
        p.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(p.kind().as_ref().map(|c| c.as_str()), Some("order.created"));
    assert_eq!(
        p.app_id().as_ref().map(|c| c.as_str()),
        Some("order-pipeline")
    );
    assert!(p.timestamp().is_some_and(|t| t > 0));
    assert_eq!(m.body["event_id"], message_id.as_str());
    assert_eq!(m.body["type"], "order.created");
    assert_eq!(m.body["occurred_at"], order["created_at"]);
    assert_eq!(
        m.body["order"], order,
        "the message carries the order as it was answered"
    );

    // Assert: the outbox drained and the stored order moved forward
    wait_outbox_drained(&db, Duration::from_secs(10)).await;
    let stored: Value = app.client.get(&location).await.json().await.expect("json");
    assert_eq!(stored["id"], id.as_str());
    assert!(["published", "processed"].contains(&stored["status"].as_str().expect("status")));
    app.stop().await;
}

#[tokio::test]
async fn a_missing_correlation_id_is_generated_and_echoed() {
    let (db, names) = (TestDb::create().await, Names::new());
    let app = TestApp::ready(base_env(&db.url(), &names)).await;

    let r = app.client.post_order(&good_order()).await;

    assert_eq!(r.status(), 201);
    let header = r.headers()["x-correlation-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    uuid::Uuid::parse_str(&header).expect("a generated UUID");
    let order: Value = r.json().await.expect("json");
    assert_eq!(order["correlation_id"], header.as_str());
    app.stop().await;
}

#[tokio::test]
async fn reads_and_unknown_routes_answer_json_errors() {
    let (db, names) = (TestDb::create().await, Names::new());
    let app = TestApp::ready(base_env(&db.url(), &names)).await;
    let c = &app.client;

    let cases = [
        (
            c.get(&format!("/orders/{}", uuid::Uuid::new_v4())).await,
            404,
            "not_found",
        ),
        (c.get("/orders/not-a-uuid").await, 400, "invalid_id"),
        (c.get("/no/such/route").await, 404, "not_found"),
        (
            c.http.put(c.url("/orders")).send().await.expect("PUT"),
            405,
            "method_not_allowed",
        ),
        (
            c.http
                .delete(c.url("/orders/x"))
                .send()
                .await
                .expect("DELETE"),
            405,
            "method_not_allowed",
        ),
        (
            c.http
                .post(c.url("/health/ready"))
                .send()
                .await
                .expect("POST"),
            405,
            "method_not_allowed",
        ),
    ];
    for (r, status, code) in cases {
        let url = r.url().to_string();
        assert_eq!(r.status(), status, "{url}");
        let body: Value = r.json().await.expect("a JSON error body");
        assert_eq!(body["error"]["code"], code, "{url}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{url}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn health_metrics_and_openapi_describe_the_service() {
    let (db, names) = (TestDb::create().await, Names::new());
    let app = TestApp::ready(base_env(&db.url(), &names)).await;
    let c = &app.client;
    let id = c.place().await;
    c.wait_processed(&id, Duration::from_secs(10)).await;

    assert_eq!(c.get("/health/live").await.status(), 200);
    let (status, ready) = c
        .ready_when("every stage running", Duration::from_secs(10), |r| {
            ["publisher", "watcher", "processor"]
                .iter()
                .all(|stage| r[*stage] == "running")
        })
        .await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["database"], "up");
    assert_eq!(ready["broker"], "up");

    // `processed` can commit before the publisher records the confirm: wait
    // for the publisher's side to settle, then check the exact figures.
    let text = c
        .metrics_when("the confirm recorded", Duration::from_secs(10), |t| {
            metric(t, "order_pipeline_messages_published_total") >= 1.0
                && metric(t, "order_pipeline_outbox_pending") == 0.0
        })
        .await;
    assert_eq!(
        metric(&text, "order_pipeline_orders_accepted_total"),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "order_pipeline_messages_published_total"),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "order_pipeline_processor_processed_total"),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "order_pipeline_outbox_pending"),
        0.0,
        "{text}"
    );
    assert!(
        metric(&text, "order_pipeline_commit_to_confirm_seconds_count") >= 1.0,
        "{text}"
    );
    assert!(
        text.contains(
            r#"order_pipeline_http_requests_total{route="/orders",method="POST",status="201"} 1"#
        ),
        "{text}"
    );

    let doc: Value = c.get("/openapi.json").await.json().await.expect("json");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    for path in [
        "/orders",
        "/orders/{id}",
        "/health/live",
        "/health/ready",
        "/metrics",
        "/outbox",
        "/outbox/dead",
        "/outbox/dead/{id}/requeue",
    ] {
        assert!(doc["paths"].get(path).is_some(), "openapi lacks {path}");
    }
    app.stop().await;
}

#[tokio::test]
async fn the_binary_refuses_bad_settings_and_usage_with_exit_code_2() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        std::process::Command::new(binary())
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .current_dir(env!("CARGO_TARGET_TMPDIR"))
            .output()
            .expect("run the binary")
    };

    assert_eq!(run(&["--help"], &[]).status.code(), Some(0));
    assert_eq!(run(&["serve", "--help"], &[]).status.code(), Some(0));
    assert_eq!(run(&["migrate", "--help"], &[]).status.code(), Some(0));
    assert_eq!(run(&["--no-such-flag"], &[]).status.code(), Some(2));
    for (var, value) in [
        ("HTTP_ADDR", "not-an-address"),
        ("DATABASE_URL", "nonsense"),
        ("AMQP_URL", "http://example"),
        ("PROCESSOR_ENABLED", "perhaps"),
        ("LOG_FORMAT", "yaml"),
    ] {
        let out = run(&["serve"], &[(var, value)]);
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(said.lines().count(), 1, "one line: {said}");
        assert!(said.contains(var), "{said}");
    }
}

#[tokio::test]
async fn migrate_creates_the_database_and_its_tables_and_is_idempotent() {
    let db = TestDb::unborn();
    for _ in 0..2 {
        let out = std::process::Command::new(binary())
            .arg("migrate")
            .env_clear()
            .env("DATABASE_URL", db.url())
            .current_dir(env!("CARGO_TARGET_TMPDIR"))
            .output()
            .expect("run migrate");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tables = db
        .client()
        .await
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
            &[],
        )
        .await
        .expect("tables");
    let tables: Vec<String> = tables.iter().map(|r| r.get(0)).collect();
    for t in ["orders", "outbox", "inbox", "outbox_dead"] {
        assert!(tables.iter().any(|x| x == t), "{t} missing from {tables:?}");
    }
}

#[tokio::test]
async fn migrate_waits_for_another_instances_migration_lock_and_says_so() {
    let db = TestDb::create().await;
    let holder = db.client().await;
    holder
        .execute(
            &format!(
                "SELECT pg_advisory_lock({})",
                order_pipeline::storage::MIGRATION_LOCK_KEY
            ),
            &[],
        )
        .await
        .expect("hold the migration lock");
    let mut child = tokio::process::Command::new(binary())
        .arg("migrate")
        .env_clear()
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run migrate");
    let mut stdout = child.stdout.take().expect("stdout");
    let said = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::AsyncReadExt as _;
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).contains("migration lock") {
            let n = stdout.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    })
    .await
    .expect("migrate says why it waits");
    assert!(said.contains("waiting"), "{said}");
    assert!(child.try_wait().expect("status").is_none(), "it waits");

    drop(holder); // the lock ends with its session
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("migrate finishes once the lock is free")
        .expect("status");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn readiness_tells_a_broker_that_refuses_the_topology_from_one_that_is_down() {
    // The exchange exists with another type: declaring ours fails with
    // PRECONDITION_FAILED although the broker is reachable.
    let (db, names) = (TestDb::create().await, Names::new());
    let conn = amqp().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_declare(
        names.exchange.as_str().into(),
        lapin::ExchangeKind::Fanout,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("a fanout exchange of the same name");
    let app = TestApp::spawn(base_env(&db.url(), &names)).await;
    let (status, ready) = app
        .client
        .ready_when("the broker misconfigured", Duration::from_secs(20), |r| {
            r["broker"] == "misconfigured"
        })
        .await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["database"], "up", "{ready}");
    app.stop().await;
}

#[tokio::test]
async fn replicas_migrating_a_missing_database_at_once_all_succeed() {
    let db = TestDb::unborn();
    let runs: Vec<_> = (0..4)
        .map(|_| {
            tokio::process::Command::new(binary())
                .arg("migrate")
                .env_clear()
                .env("DATABASE_URL", db.url())
                .output()
        })
        .collect();
    for out in futures_util::future::join_all(runs).await {
        let out = out.expect("run migrate");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(db.count("SELECT count(*) FROM outbox").await, 0);
}
