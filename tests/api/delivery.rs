//! From the outbox to the broker: backlog replay, wake-ups, a dropped broker
//! connection, and a crash of the whole process.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

/// Writes an order and its outbox row the way another writer would (the same
/// transaction, optionally with the NOTIFY); returns the order id.
async fn insert_behind_the_service(db: &TestDb, notify: bool) -> String {
    let id = uuid::Uuid::new_v4();
    let event = uuid::Uuid::new_v4();
    let order = json!({"id": id, "status": "accepted", "correlation_id": "backdoor", "customer_id": "c",
                       "currency": "EUR", "total_cents": 1,
                       "items": [{"sku": "a", "quantity": 1, "unit_price_cents": 1}],
                       "created_at": "2026-01-01T00:00:00.000000Z"});
    let payload = json!({"event_id": event, "type": "order.created", "occurred_at": order["created_at"], "order": order});
    let notify = if notify {
        "NOTIFY order_pipeline_outbox;"
    } else {
        ""
    };
    db.execute(&format!(
        "BEGIN; \
         INSERT INTO orders (id, correlation_id, customer_id, currency, total_cents, items, created_at) \
           VALUES ('{id}', 'backdoor', 'c', 'EUR', 1, '{items}', now()); \
         INSERT INTO outbox (id, order_id, event_type, routing_key, correlation_id, payload) \
           VALUES ('{event}', '{id}', 'order.created', 'order.created', 'backdoor', '{payload}'); \
         {notify} COMMIT;",
        items = order["items"],
    ))
    .await;
    id.to_string()
}

#[tokio::test]
async fn a_backlog_left_while_the_broker_was_unreachable_is_published_on_start_oldest_first() {
    // Arrange: orders accepted while the broker could not be reached.
    let (db, names) = (TestDb::create().await, Names::new());
    let dead_broker = TcpProxy::start(AMQP_PORT).await;
    dead_broker.cut();
    let mut env = base_env(&db.url(), &names);
    env.insert("AMQP_URL".into(), amqp_url_via(dead_broker.port));
    let app = TestApp::spawn(env).await;
    let mut ids = Vec::new();
    eventually("orders to be accepted", Duration::from_secs(30), || async {
        (app.client.post_order(&good_order()).await.status() == 201).then_some(())
    })
    .await;
    for _ in 0..30 {
        ids.push(app.client.place().await);
    }
    assert_eq!(
        dead_broker.accepted(),
        0,
        "the broker must have been unreachable"
    );
    app.stop().await;
    let backlog = db.count("SELECT count(*) FROM outbox").await;
    assert_eq!(backlog, 31, "the backlog is in the outbox");

    // Act: a new process with a reachable broker.
    let spy = Spy::on(&names.exchange).await;
    let app = TestApp::spawn(base_env(&db.url(), &names)).await;

    // Assert: everything published, in commit order, and the outbox empty.
    spy.wait_for_orders(&ids, Duration::from_secs(20)).await;
    let seen = spy.order_ids();
    let positions: Vec<usize> = ids
        .iter()
        .map(|id| seen.iter().position(|s| s == id).expect("seen"))
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "replayed oldest first: {positions:?}"
    );
    eventually("the outbox to drain", Duration::from_secs(10), || async {
        (db.count("SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_notify_wakes_the_publisher_without_waiting_for_the_sweep() {
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let mut env = base_env(&db.url(), &names);
    // A sweep that never comes during this test.
    env.insert("OUTBOX_SWEEP_INTERVAL_MS".into(), "600000".into());
    let app = TestApp::spawn(env).await;
    app.client.wait_ready().await;
    // Let the start-up catch-up sweep pass.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Without a NOTIFY nothing wakes the publisher...
    let silent = insert_behind_the_service(&db, false).await;
    assert!(
        !spy.anything_within(Duration::from_secs(2)).await,
        "published without any wake-up"
    );

    // ...a NOTIFY does, at once (and the earlier row goes with it).
    let notified = insert_behind_the_service(&db, true).await;
    spy.wait_for_orders(&[silent, notified], Duration::from_secs(3))
        .await;
    app.stop().await;
}

#[tokio::test]
async fn the_timer_sweep_publishes_a_row_nobody_notified() {
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let mut env = base_env(&db.url(), &names);
    env.insert("OUTBOX_SWEEP_INTERVAL_MS".into(), "300".into());
    let app = TestApp::spawn(env).await;
    app.client.wait_ready().await;

    let id = insert_behind_the_service(&db, false).await;

    spy.wait_for_orders(&[id], Duration::from_secs(3)).await;
    app.stop().await;
}

#[tokio::test]
async fn the_publisher_recovers_from_a_dropped_broker_connection_and_publishes_what_piled_up() {
    // Arrange
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let proxy = TcpProxy::start(AMQP_PORT).await;
    let mut env = base_env(&db.url(), &names);
    env.insert("AMQP_URL".into(), amqp_url_via(proxy.port));
    let app = TestApp::spawn(env).await;
    app.client.wait_ready().await;
    let first = app.client.place().await;
    spy.wait_for_orders(std::slice::from_ref(&first), Duration::from_secs(10))
        .await;

    // Act: cut the broker off; orders keep coming.
    let cut = proxy.cut();
    assert!(cut > 0, "the proxy must have cut live broker connections");
    let (status, ready) = eventually(
        "readiness to report the broker down",
        Duration::from_secs(15),
        || async {
            app.client
                .ready()
                .await
                .filter(|(_, body)| body["broker"] == "down")
        },
    )
    .await;
    assert_eq!(status, 503, "{ready}");
    let mut piled_up = Vec::new();
    for _ in 0..20 {
        piled_up.push(app.client.place().await);
    }
    assert!(
        db.count("SELECT count(*) FROM outbox").await >= 20,
        "they wait in the outbox"
    );
    proxy.restore();

    // Assert
    spy.wait_for_orders(&piled_up, Duration::from_secs(30))
        .await;
    app.client.wait_ready().await;
    eventually("the outbox to drain", Duration::from_secs(10), || async {
        (db.count("SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    let restarts = metric(
        &app.client.metrics().await,
        "order_pipeline_stage_restarts_total",
    );
    assert!(
        restarts >= 1.0,
        "the publisher was restarted by its supervisor"
    );
    app.stop().await;
}

#[tokio::test]
async fn orders_answered_201_before_a_kill_9_are_all_published_after_the_restart() {
    // Arrange: the real binary under a steady stream of orders.
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let mut service = ServiceProcess::new(base_env(&db.url(), &names));
    service.start();
    service.client.wait_ready().await;
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for _ in 0..4 {
        let (accepted, stop, client) = (accepted.clone(), stop.clone(), Client::new(service.port));
        writers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Errors are expected while the process is down; only 201s count.
                let Ok(r) = client
                    .http
                    .post(client.url("/orders"))
                    .header("content-type", "application/json")
                    .body(good_order().to_string())
                    .send()
                    .await
                else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                if r.status() == 201 {
                    if let Ok(v) = r.json::<serde_json::Value>().await {
                        accepted
                            .lock()
                            .expect("lock")
                            .push(v["id"].as_str().unwrap_or_default().to_owned());
                    }
                }
            }
        }));
    }
    eventually(
        "some orders to be accepted",
        Duration::from_secs(20),
        || async { (accepted.lock().expect("lock").len() >= 200).then_some(()) },
    )
    .await;

    // Act: kill -9 mid-stream, then start again.
    let old_pid = service.pid();
    service.kill9();
    let during_crash = accepted.lock().expect("lock").len();
    service.start();
    assert_ne!(service.pid(), old_pid, "a new process");
    service.client.wait_ready().await;
    eventually(
        "more orders after the restart",
        Duration::from_secs(20),
        || async { (accepted.lock().expect("lock").len() >= during_crash + 100).then_some(()) },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }

    // Assert: lost = 0 (every 201 published), unexpected = 0 (nothing published
    // that was not stored), and the outbox drained.
    let accepted: Vec<String> = accepted.lock().expect("lock").clone();
    spy.wait_for_orders(&accepted, Duration::from_secs(60))
        .await;
    let stored: HashSet<String> = db
        .client()
        .await
        .query("SELECT id::text FROM orders", &[])
        .await
        .expect("orders")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let unexpected: Vec<String> = spy
        .order_ids()
        .into_iter()
        .filter(|id| !stored.contains(id))
        .collect();
    assert!(
        unexpected.is_empty(),
        "published but never stored: {:?}",
        &unexpected[..unexpected.len().min(5)]
    );
    eventually("the outbox to drain", Duration::from_secs(20), || async {
        (db.count("SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_0_within_10_s_and_loses_nothing() {
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let mut service = ServiceProcess::new(base_env(&db.url(), &names));
    service.start();
    service.client.wait_ready().await;
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for _ in 0..4 {
        let (accepted, stop, client) = (accepted.clone(), stop.clone(), Client::new(service.port));
        writers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(r) = client
                    .http
                    .post(client.url("/orders"))
                    .header("content-type", "application/json")
                    .body(good_order().to_string())
                    .send()
                    .await
                else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                if r.status() == 201 {
                    if let Ok(v) = r.json::<serde_json::Value>().await {
                        accepted
                            .lock()
                            .expect("lock")
                            .push(v["id"].as_str().unwrap_or_default().to_owned());
                    }
                }
            }
        }));
    }
    eventually("orders under way", Duration::from_secs(20), || async {
        (accepted.lock().expect("lock").len() >= 200).then_some(())
    })
    .await;

    let (code, took) = tokio::task::block_in_place(|| service.term(Duration::from_secs(15)));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }

    assert_eq!(
        code,
        Some(0),
        "SIGTERM must exit 0 (took {took:?})\n{}",
        service.logs()
    );
    assert!(took < Duration::from_secs(10), "SIGTERM took {took:?}");
    // Whatever the drain did not publish is still in the outbox: a restart sends it.
    service.start();
    let accepted: Vec<String> = accepted.lock().expect("lock").clone();
    spy.wait_for_orders(&accepted, Duration::from_secs(30))
        .await;
}
