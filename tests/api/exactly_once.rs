//! Exactly-once effect: however often an order is retried or delivered, it is
//! created once and processed once (Idempotency-Key, inbox, forward-only status).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::{BasicProperties, Confirmation};
use serde_json::{Value, json};

use crate::helpers::*;

async fn wait_processed(client: &Client, id: &str) {
    client.wait_processed(id, Duration::from_secs(15)).await;
}

/// Publishes straight to a queue through the default exchange, with confirms.
async fn publish_to_queue(queue: &str, properties: BasicProperties, body: &[u8]) {
    let conn = amqp().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert_eq!(confirm, Confirmation::Ack(None));
}

#[tokio::test]
async fn the_same_message_delivered_twice_is_processed_once() {
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let app = TestApp::ready(base_env(&db.url(), &names)).await;
    let id = app.client.place().await;
    wait_processed(&app.client, &id).await;
    spy.wait_for_orders(std::slice::from_ref(&id), Duration::from_secs(15))
        .await;
    let original = spy.messages().remove(0);

    // A re-publication: the very same message_id, straight to the queue.
    publish_to_queue(
        &names.queue,
        original.properties.clone(),
        original.body.to_string().as_bytes(),
    )
    .await;

    eventually(
        "the duplicate to be dropped",
        Duration::from_secs(10),
        || async {
            let m = app.client.metrics().await;
            (metric(&m, "order_pipeline_processor_duplicates_dropped_total") >= 1.0).then_some(())
        },
    )
    .await;
    assert_eq!(db.count("SELECT count(*) FROM inbox").await, 1);
    let m = app.client.metrics().await;
    assert_eq!(metric(&m, "order_pipeline_processor_processed_total"), 1.0);
    assert_eq!(
        app.client.status_of(&id).await.as_deref(),
        Some("processed")
    );
    app.stop().await;
}

#[tokio::test]
async fn poison_messages_go_to_the_dead_letter_queue_and_the_processor_goes_on() {
    let (db, names) = (TestDb::create().await, Names::new());
    let app = TestApp::ready(base_env(&db.url(), &names)).await;
    let with_id = |id: &str| BasicProperties::default().with_message_id(id.into());
    let unknown_order = json!({"event_id": uuid::Uuid::new_v4(), "type": "order.created",
                               "order": {"id": uuid::Uuid::new_v4()}});

    publish_to_queue(&names.queue, with_id("poison-1"), b"this is not json").await;
    publish_to_queue(
        &names.queue,
        BasicProperties::default(),
        unknown_order.to_string().as_bytes(),
    )
    .await;
    publish_to_queue(
        &names.queue,
        with_id("poison-3"),
        unknown_order.to_string().as_bytes(),
    )
    .await;
    let id = app.client.place().await;

    wait_processed(&app.client, &id).await;
    let conn = amqp().await;
    let ch = conn.create_channel().await.expect("channel");
    let reasons = Arc::new(Mutex::new(Vec::new()));
    eventually("three dead letters", Duration::from_secs(10), || async {
        while let Some(m) = ch
            .basic_get(
                names.dead_letter_queue().as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic_get")
        {
            let reason = match m
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-death-reason").cloned())
            {
                Some(lapin::types::AMQPValue::LongString(s)) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                other => format!("{other:?}"),
            };
            reasons.lock().expect("lock").push(reason);
        }
        (reasons.lock().expect("lock").len() >= 3).then_some(())
    })
    .await;
    let reasons = reasons.lock().expect("lock").clone();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("not an order event")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("no message_id")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("unknown order")),
        "{reasons:?}"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM inbox").await,
        1,
        "poison never reaches the inbox"
    );
    // The counter moves once the dead-letter confirm reaches the processor,
    // which can be just after the message shows up in the queue.
    let m = app
        .client
        .metrics_when("3 dead-lettered", Duration::from_secs(10), |m| {
            metric(m, "order_pipeline_processor_dead_lettered_total") >= 3.0
        })
        .await;
    assert_eq!(
        metric(&m, "order_pipeline_processor_dead_lettered_total"),
        3.0
    );
    app.stop().await;
}

#[tokio::test]
async fn a_poison_message_the_dead_letter_queue_refuses_holds_back_nothing_and_is_kept() {
    let (db, names) = (TestDb::create().await, Names::new());
    // The dead-letter queue refuses everything (a policy an operator might set).
    let dlq = names.dead_letter_queue();
    let refusing = RefusingQueue::on(&dlq).await;
    let mut env = base_env(&db.url(), &names);
    // A small window, so that deliveries held back would stall everything.
    env.insert("PROCESSOR_PREFETCH".into(), "4".into());
    let app = TestApp::ready(env).await;

    let poison = BasicProperties::default().with_message_id("poison-kept".into());
    publish_to_queue(&names.queue, poison, b"not an order event").await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(app.client.place().await);
    }

    // The fault happened: the dead-letter queue refused the poison message...
    app.client
        .metrics_when("a refused dead letter", Duration::from_secs(15), |m| {
            metric(m, "order_pipeline_processor_dead_letter_failures_total") >= 1.0
        })
        .await;
    // ...and every order behind it is processed all the same, without restarts.
    for id in &ids {
        wait_processed(&app.client, id).await;
    }
    let m = app.client.metrics().await;
    assert_eq!(
        metric(&m, "order_pipeline_stage_restarts_total"),
        0.0,
        "the processor kept running: {m}"
    );

    // Nothing lost: once the dead-letter queue takes messages, it is there.
    refusing.lift().await;
    let conn = amqp().await;
    let ch = conn.create_channel().await.expect("channel");
    let got = eventually(
        "the poison message in the dead-letter queue",
        Duration::from_secs(30),
        || async {
            ch.basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic_get")
        },
    )
    .await;
    assert_eq!(
        got.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str()),
        Some("poison-kept")
    );
    app.stop().await;
}

#[tokio::test]
async fn concurrent_posts_with_one_idempotency_key_create_one_order() {
    let (db, names) = (TestDb::create().await, Names::new());
    let app = TestApp::ready(base_env(&db.url(), &names)).await;

    let mut tasks = Vec::new();
    for _ in 0..16 {
        let client = Client::new(app.port);
        tasks.push(tokio::spawn(async move {
            let r = client
                .post_order_with(&good_order(), &[("Idempotency-Key", "key-16-at-once")])
                .await;
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.expect("json"))
        }));
    }
    let mut statuses = Vec::new();
    let mut ids = HashSet::new();
    for t in tasks {
        let (status, body) = t.await.expect("task");
        statuses.push(status);
        ids.insert(body["id"].as_str().expect("id").to_owned());
    }

    statuses.sort_unstable();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        15,
        "{statuses:?}"
    );
    assert_eq!(ids.len(), 1, "all got the one order's id: {ids:?}");
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 1);
    // One order means one message: wait for the pipeline to settle before
    // counting (outbox and inbox change in separate transactions, so a sum of
    // the two read mid-flight can see the message in both).
    let id = ids.into_iter().next().expect("one id");
    wait_processed(&app.client, &id).await;
    wait_outbox_drained(&db, Duration::from_secs(10)).await;
    assert_eq!(db.count("SELECT count(*) FROM inbox").await, 1);
    let m = app.client.metrics().await;
    assert_eq!(metric(&m, "order_pipeline_messages_published_total"), 1.0);
    app.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_replays_the_same_body_and_refuses_another() {
    let (db, names) = (TestDb::create().await, Names::new());
    let app = TestApp::ready(base_env(&db.url(), &names)).await;
    let key = [("Idempotency-Key", "retry-me")];

    let first = app.client.post_order_with(&good_order(), &key).await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.expect("json");
    let again = app.client.post_order_with(&good_order(), &key).await;
    assert_eq!(again.status(), 200);
    assert!(again.headers().get("location").is_none());
    let again: Value = again.json().await.expect("json");
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["created_at"], first["created_at"]);

    let mut other = good_order();
    other["items"][0]["quantity"] = json!(3);
    let refused = app.client.post_order_with(&other, &key).await;
    assert_eq!(refused.status(), 422);
    let err: Value = refused.json().await.expect("json");
    assert_eq!(err["error"]["code"], "idempotency_key_reused");

    let unkeyed = app.client.post_order(&good_order()).await;
    assert_eq!(
        unkeyed.status(),
        201,
        "the same body without a key is a new order"
    );
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 2);
    app.stop().await;
}

#[tokio::test]
async fn an_expired_idempotency_key_is_forgotten_and_may_create_a_new_order() {
    use diesel_async::AsyncConnection as _;
    use order_pipeline::storage::orders;

    let (db, names) = (TestDb::create().await, Names::new());
    let app = TestApp::ready(base_env(&db.url(), &names)).await;
    let key = [("Idempotency-Key", "old-key")];
    let first = app.client.post_order_with(&good_order(), &key).await;
    assert_eq!(first.status(), 201);

    // What the persist stage's expiry round does, with "now" a day ahead.
    let mut conn = diesel_async::AsyncPgConnection::establish(&db.url())
        .await
        .expect("connect");
    let a_day_later = chrono::Utc::now() + chrono::Duration::hours(24);
    let recent = orders::expire_idempotency_keys(
        &mut conn,
        chrono::Utc::now() - chrono::Duration::hours(24),
        1000,
    )
    .await
    .expect("expire");
    assert_eq!(recent, 0, "a key younger than its time to live is kept");
    // The expiry skips rows another transaction holds (the publisher or the
    // processor moving this order on): the next round takes them.
    let mut expired = 0;
    for _ in 0..100 {
        expired += orders::expire_idempotency_keys(&mut conn, a_day_later, 1000)
            .await
            .expect("expire");
        if expired > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(expired, 1);

    let again = app.client.post_order_with(&good_order(), &key).await;
    assert_eq!(again.status(), 201, "a forgotten key creates a new order");
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 2);
    app.stop().await;
}

#[tokio::test]
async fn a_late_published_never_moves_a_processed_order_back() {
    use diesel_async::AsyncConnection as _;
    use order_pipeline::domain::OrderStatus;
    use order_pipeline::storage::orders;

    let (db, names) = (TestDb::create().await, Names::new());
    let app = TestApp::ready(base_env(&db.url(), &names)).await;
    let id = app.client.place().await;
    wait_processed(&app.client, &id).await;

    let mut conn = diesel_async::AsyncPgConnection::establish(&db.url())
        .await
        .expect("connect");
    let uuid = uuid::Uuid::parse_str(&id).expect("uuid");
    let moved = orders::advance_status(&mut conn, &[uuid], OrderStatus::Published)
        .await
        .expect("update");

    assert_eq!(moved, 0);
    assert_eq!(
        app.client.status_of(&id).await.as_deref(),
        Some("processed")
    );
    app.stop().await;
}

#[tokio::test]
async fn a_kill_9_while_the_processor_is_busy_leaves_every_order_processed_exactly_once() {
    // Arrange: a backlog on the queue, published while nobody consumed it.
    let (db, names) = (TestDb::create().await, Names::new());
    let mut env = base_env(&db.url(), &names);
    env.insert("PROCESSOR_ENABLED".into(), "false".into());
    let app = TestApp::ready(env.clone()).await;
    let n = 3000;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let client = Client::new(app.port);
        tasks.push(tokio::spawn(async move {
            for _ in (w..n).step_by(8) {
                client.place().await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    eventually(
        "the backlog to be published",
        Duration::from_secs(60),
        || async {
            (db.count("SELECT count(*) FROM orders WHERE status = 'published'")
                .await
                == n as i64)
                .then_some(())
        },
    )
    .await;
    app.stop().await;

    // Act: the processor starts on it (small batches) and is killed mid-way.
    env.insert("PROCESSOR_ENABLED".into(), "true".into());
    env.insert("PROCESSOR_PREFETCH".into(), "4".into());
    let mut service = ServiceProcess::new(env.clone());
    service.start();
    eventually(
        "the processor to be busy",
        Duration::from_secs(30),
        || async { (db.count("SELECT count(*) FROM inbox").await > 0).then_some(()) },
    )
    .await;
    let old_pid = service.pid();
    service.kill9();
    let at_kill = db.count("SELECT count(*) FROM inbox").await;
    assert!(
        at_kill < n as i64,
        "the kill came after all {n} were processed; it proved nothing"
    );
    service.start();
    assert_ne!(service.pid(), old_pid);

    // Assert: inbox rows = distinct orders, every one processed.
    eventually("every order processed", Duration::from_secs(60), || async {
        (db.count("SELECT count(*) FROM orders WHERE status = 'processed'")
            .await
            == n as i64)
            .then_some(())
    })
    .await;
    assert_eq!(db.count("SELECT count(*) FROM inbox").await, n as i64);
    assert_eq!(
        db.count("SELECT count(DISTINCT order_id) FROM inbox").await,
        n as i64
    );
    eprintln!("processed {at_kill} of {n} before the kill -9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_a_kill_9_leave_exactly_one_processed_order_per_idempotency_key() {
    // Clients that time out and retry with their key, and the service killed
    // in the middle: one order per distinct key, every one processed, and as
    // many inbox rows as orders.
    let (db, names) = (TestDb::create().await, Names::new());
    let mut service = ServiceProcess::new(base_env(&db.url(), &names));
    service.start();
    service.client.wait_ready().await;
    let answered: Arc<Mutex<HashMap<String, HashSet<String>>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..6 {
        let (answered, stop, port) = (answered.clone(), stop.clone(), service.port);
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_millis(300 + 100 * c))
                .build()
                .expect("client");
            let mut k = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                k += 1;
                let key = format!("client-{c}-order-{k}");
                let body = json!({"customer_id": format!("c-{c}"), "currency": "EUR",
                                  "items": [{"sku": format!("sku-{k}"), "quantity": 1, "unit_price_cents": 5}]});
                // Each order is sent 1..=3 times, like a client that is never sure.
                let tries = 1 + (k + c as usize) % 3;
                for _ in 0..tries {
                    let r = http
                        .post(format!("http://127.0.0.1:{port}/orders"))
                        .header("content-type", "application/json")
                        .header("Idempotency-Key", &key)
                        .body(body.to_string())
                        .send()
                        .await;
                    if let Ok(r) = r
                        && (r.status() == 201 || r.status() == 200)
                        && let Ok(v) = r.json::<Value>().await
                    {
                        let id = v["id"].as_str().unwrap_or_default().to_owned();
                        answered.lock().expect("lock").entry(key.clone()).or_default().insert(id);
                    }
                }
            }
        }));
    }
    let count = |a: &Arc<Mutex<HashMap<String, HashSet<String>>>>| a.lock().expect("lock").len();
    eventually("keys answered", Duration::from_secs(30), || async {
        (count(&answered) >= 300).then_some(())
    })
    .await;
    let old_pid = service.pid();
    tokio::task::block_in_place(|| service.kill9());
    service.start();
    assert_ne!(service.pid(), old_pid);
    service.client.wait_ready().await;
    let before = count(&answered);
    eventually(
        "keys answered after the restart",
        Duration::from_secs(30),
        || async { (count(&answered) >= before + 300).then_some(()) },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.await.expect("client");
    }

    let answered = answered.lock().expect("lock").clone();
    let split: Vec<_> = answered
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .take(3)
        .collect();
    assert!(
        split.is_empty(),
        "a key answered with two orders: {split:?}"
    );
    // A request whose client gave up may still commit later (within the
    // service's own deadline), so every figure is read in one snapshot, and
    // the test waits for a snapshot in which the pipeline has caught up.
    let [orders, keys, processed, inbox] =
        eventually("every order processed", Duration::from_secs(60), || async {
            let counts = db
                .counts(
                    "SELECT count(*), count(DISTINCT idempotency_key), \
                            count(*) FILTER (WHERE status = 'processed'), \
                            (SELECT count(*) FROM inbox) \
                     FROM orders",
                )
                .await;
            let [orders, _, processed, _] = counts[..] else {
                unreachable!()
            };
            (processed == orders).then(|| <[i64; 4]>::try_from(counts).expect("4 counts"))
        })
        .await;
    assert_eq!(orders, keys, "exactly one order per distinct key");
    assert!(
        orders >= answered.len() as i64,
        "every answered key has its order"
    );
    assert_eq!(processed, orders);
    assert_eq!(inbox, orders, "inbox rows = orders");
    eprintln!(
        "{orders} orders for {keys} keys ({} answered to clients), all processed once",
        answered.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_correlation_id_reaches_the_message_and_every_log_line_about_the_order() {
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let mut env = base_env(&db.url(), &names);
    env.insert("LOG_FORMAT".into(), "json".into());
    env.insert("RUST_LOG".into(), "info".into());
    let mut service = ServiceProcess::new(env);
    service.start();
    service.client.wait_ready().await;

    let r = service
        .client
        .post_order_with(&good_order(), &[("X-Correlation-ID", "trace-me-123")])
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-correlation-id"], "trace-me-123");
    let id = r.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    wait_processed(&service.client, &id).await;
    spy.wait_for_orders(std::slice::from_ref(&id), Duration::from_secs(15))
        .await;
    let m = &spy.messages()[0];
    assert_eq!(
        m.properties.correlation_id().as_ref().map(|c| c.as_str()),
        Some("trace-me-123")
    );

    let (code, _) = tokio::task::block_in_place(|| service.term(Duration::from_secs(15)));
    assert_eq!(code, Some(0));
    let lines: Vec<Value> = service
        .logs()
        .lines()
        .filter(|l| l.contains(&id))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let correlation = |l: &Value| {
        l["correlation_id"]
            .as_str()
            .or_else(|| l["span"]["correlation_id"].as_str())
            .map(str::to_owned)
    };
    for l in &lines {
        assert_eq!(
            correlation(l).as_deref(),
            Some("trace-me-123"),
            "a log line about the order without its correlation id: {l}"
        );
    }
    for message in ["order accepted", "order published", "order processed"] {
        assert!(
            lines.iter().any(|l| l["message"] == message),
            "no {message:?} line: {lines:?}"
        );
    }
}
