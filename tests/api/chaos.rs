//! The chaos suite: one test per failure case. Each first proves that its
//! fault happened (the process id changed, the backend left
//! `pg_stat_activity`, the proxy cut live connections, the broker refused),
//! then proves what survived. Vocabulary of RabbitMQ's Jepsen checker: LOST
//! (answered 201, never published) and UNEXPECTED (published, never stored)
//! must be 0 everywhere; DUPLICATED is bounded.
//!
//! Fault 10 (broker flow control) blocks the whole broker, so it lives in a
//! test binary of its own (`tests/flow_control.rs`) that runs alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::QueueBindOptions;
use lapin::types::FieldTable;
use order_pipeline::pipeline::faults::Faults;
use order_pipeline::pipeline::publisher::BATCHES_IN_FLIGHT;
use serde_json::Value;

use crate::helpers::*;

const BATCH: usize = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_1_kill_9_under_load_three_times_loses_nothing() {
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let mut service = ServiceProcess::new(base_env(&db.url(), &names));
    service.start();
    service.client.wait_ready().await;
    let load = Load::start(service.port, 4);

    let kills = 3;
    for _ in 0..kills {
        load.wait_for_more(150, Duration::from_secs(30)).await;
        let old = service.pid();
        tokio::task::block_in_place(|| service.kill9());
        service.start();
        assert_ne!(service.pid(), old, "the fault: a new process");
        service.client.wait_ready().await;
    }
    load.wait_for_more(150, Duration::from_secs(30)).await;
    let accepted = load.stop().await;

    spy.wait_for_orders(&accepted, Duration::from_secs(60))
        .await;
    wait_outbox_drained(&db, Duration::from_secs(30)).await;
    let verdict = Verdict::of(&accepted, &spy, &db).await;
    verdict.assert_nothing_lost_or_unexpected();
    // A kill can catch at most the confirm window (the batches in flight)
    // confirmed but not yet deleted, plus one batch.
    let bound = kills * (BATCHES_IN_FLIGHT + 1) * BATCH;
    assert!(
        verdict.duplicates() <= bound,
        "DUPLICATED: {} copies after {kills} kills, e.g. {:?}",
        verdict.duplicates(),
        &verdict.duplicated[..verdict.duplicated.len().min(5)]
    );
    eprintln!(
        "fault 1: {} accepted over {kills} kills; lost 0, unexpected 0, duplicated {}",
        accepted.len(),
        verdict.duplicates()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_2_sigterm_under_load_exits_0_within_10_s_with_confirms_awaited() {
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let mut env = base_env(&db.url(), &names);
    env.insert("RUST_LOG".into(), "info".into());
    let mut service = ServiceProcess::new(env);
    service.start();
    service.client.wait_ready().await;
    let load = Load::start(service.port, 4);
    load.wait_for_more(300, Duration::from_secs(30)).await;

    let (code, took) = tokio::task::block_in_place(|| service.term(Duration::from_secs(15)));
    let accepted = load.stop().await;

    assert_eq!(
        code,
        Some(0),
        "SIGTERM must exit 0 (after {took:?})\n{}",
        service.logs()
    );
    assert!(took < Duration::from_secs(10), "SIGTERM took {took:?}");
    eprintln!("fault 2: SIGTERM under load exited 0 after {took:?}");
    assert!(
        service.logs().contains("shut down cleanly"),
        "nothing forced:\n{}",
        service.logs()
    );
    // In-flight confirms were awaited and recorded: nothing the broker
    // confirmed is still in the outbox.
    let _ = spy.anything_within(Duration::from_millis(500)).await;
    let published: std::collections::HashSet<String> =
        spy.messages().iter().map(Seen::message_id).collect();
    let still_pending: Vec<String> = db
        .texts("SELECT id::text FROM outbox")
        .await
        .into_iter()
        .filter(|id| published.contains(id))
        .collect();
    assert!(
        still_pending.is_empty(),
        "confirmed but not recorded at exit: {still_pending:?}"
    );

    // Whatever the drain did not reach is in the outbox: the next start sends it.
    service.start();
    spy.wait_for_orders(&accepted, Duration::from_secs(30))
        .await;
    Verdict::of(&accepted, &spy, &db)
        .await
        .assert_nothing_lost_or_unexpected();
}

#[tokio::test]
async fn fault_3_a_broker_outage_keeps_orders_coming_and_the_backlog_drains_after() {
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let proxy = TcpProxy::start(AMQP_PORT).await;
    let mut env = base_env(&db.url(), &names);
    env.insert("AMQP_URL".into(), amqp_url_via(proxy.port));
    let app = TestApp::ready(env).await;
    let first = app.client.place().await;
    spy.wait_for_orders(std::slice::from_ref(&first), Duration::from_secs(10))
        .await;

    let cut = proxy.cut();
    assert!(cut > 0, "the fault: the proxy cut live broker connections");
    let (status, ready) = app
        .client
        .ready_when("the broker down", Duration::from_secs(15), |b| {
            b["broker"] == "down"
        })
        .await;
    assert_eq!(status, 503, "{ready}");
    let mut accepted = vec![first];
    for _ in 0..20 {
        accepted.push(app.client.place().await);
    }
    assert!(
        db.count("SELECT count(*) FROM outbox").await >= 20,
        "they wait in the outbox"
    );
    proxy.restore();

    spy.wait_for_orders(&accepted, Duration::from_secs(30))
        .await;
    app.client.wait_ready().await;
    wait_outbox_drained(&db, Duration::from_secs(10)).await;
    Verdict::of(&accepted, &spy, &db)
        .await
        .assert_nothing_lost_or_unexpected();
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

async fn assert_503_within_5_s(
    what: &str,
    request: impl std::future::Future<Output = reqwest::Response>,
) {
    let started = Instant::now();
    let r = request.await;
    let took = started.elapsed();
    assert_eq!(r.status(), 503, "{what} during the outage");
    let body: Value = r.json().await.expect("JSON error");
    assert_eq!(body["error"]["code"], "unavailable", "{what}: {body}");
    assert!(took < Duration::from_secs(5), "{what} took {took:?}");
}

#[tokio::test]
async fn fault_4_a_database_outage_answers_503_within_5_s_and_recovers_by_itself() {
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let proxy = TcpProxy::start(PG_PORT).await;
    let app = TestApp::spawn(base_env(&db.url_via(proxy.port), &names)).await;
    let c = &app.client;
    c.wait_ready().await;
    let before = c.place().await;

    // Cut: every connection closed, new ones refused.
    assert!(
        proxy.cut() > 0,
        "the fault: the proxy cut live database connections"
    );
    for _ in 0..3 {
        assert_503_within_5_s("POST /orders", c.post_order(&good_order())).await;
    }
    assert_503_within_5_s("GET /orders/{id}", c.get(&format!("/orders/{before}"))).await;
    let (status, ready) = c.ready().await.expect("ready answers");
    assert_eq!(
        (status, ready["database"].as_str()),
        (503, Some("down")),
        "{ready}"
    );

    // Stalled: connections open, nothing answers (a hung database).
    proxy.restore();
    c.wait_ready().await;
    proxy.stall();
    assert_503_within_5_s("POST /orders (stalled)", c.post_order(&good_order())).await;
    proxy.restore();

    // Recovers by itself.
    let after = eventually(
        "orders to be accepted again",
        Duration::from_secs(20),
        || async {
            let r = c.post_order(&good_order()).await;
            if r.status() == 201 {
                return r.json::<Value>().await.ok()?["id"]
                    .as_str()
                    .map(str::to_owned);
            }
            None
        },
    )
    .await;
    spy.wait_for_orders(&[before, after], Duration::from_secs(20))
        .await;
    c.wait_ready().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_4_a_stuck_database_never_stores_an_order_whose_client_heard_503() {
    // Another session locks `orders` for longer than a request may wait. The
    // orders queued behind the stuck transactions must not commit after
    // their clients were told 503: a retry without a key would then
    // duplicate them.
    let (db, names) = (TestDb::create().await, Names::new());
    let app = TestApp::ready(base_env(&db.url(), &names)).await;
    let locker = db.client().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE orders IN SHARE ROW EXCLUSIVE MODE")
        .await
        .expect("lock orders");

    let mut requests = Vec::new();
    for i in 0..12 {
        let client = Client::new(app.port);
        let customer = format!("stuck-{i}");
        requests.push(tokio::spawn(async move {
            let status = client.post_order(&order_of(&customer)).await.status();
            (customer, status.as_u16())
        }));
    }
    let waiting = eventually(
        "the service's inserts to wait on the lock",
        Duration::from_secs(5),
        || async {
            let n = db
                .count(&format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
                     AND application_name LIKE 'order-pipeline-pool%' AND wait_event_type = 'Lock'",
                    db.name
                ))
                .await;
            (n > 0).then_some(n)
        },
    )
    .await;
    // Held past the requests' 4.5 s deadline, then released.
    tokio::time::sleep(Duration::from_millis(4800)).await;
    locker.batch_execute("COMMIT").await.expect("unlock");

    let mut answers = Vec::new();
    for r in requests {
        answers.push(r.await.expect("request"));
    }
    assert!(
        answers.iter().all(|(_, s)| *s == 503),
        "the fault: every request outlived its deadline: {answers:?}"
    );
    // Whatever was still on its way to the database has ended by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stored = db.count("SELECT count(*) FROM orders").await;
    assert_eq!(
        stored, 0,
        "{stored} orders stored although every client heard 503 ({waiting} inserts waited on the lock)"
    );
    app.client.wait_ready().await;
    app.client.place().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_5_unreachable_dependencies_at_start_up_keep_the_process_up_until_they_return() {
    let (db, names) = (TestDb::unborn(), Names::new());
    let spy = Spy::on(&names.exchange).await;
    let (pg, mq) = (
        TcpProxy::start(PG_PORT).await,
        TcpProxy::start(AMQP_PORT).await,
    );
    pg.cut();
    mq.cut();
    let mut env = base_env(&db.url_via(pg.port), &names);
    env.insert("AMQP_URL".into(), amqp_url_via(mq.port));
    let mut service = ServiceProcess::new(env);
    service.start();
    service.wait_live().await;

    let c = Client::new(service.port);
    let (status, ready) = c.ready().await.expect("ready answers");
    assert_eq!(status, 503);
    assert_eq!(
        (ready["database"].as_str(), ready["broker"].as_str()),
        (Some("down"), Some("down")),
        "{ready}"
    );
    assert_503_within_5_s("POST /orders", c.post_order(&good_order())).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(service.exited(), None, "the process must stay up");
    assert_eq!(
        (pg.accepted(), mq.accepted()),
        (0, 0),
        "the fault: neither dependency was reachable"
    );

    // The database comes back: it is created and migrated, orders are accepted.
    pg.restore();
    let (_, ready) = c
        .ready_when("the database up", Duration::from_secs(30), |b| {
            b["database"] == "up"
        })
        .await;
    assert_eq!(ready["broker"], "down", "{ready}");
    let id = c.place().await;

    // The broker comes back: everything works.
    mq.restore();
    c.wait_ready().await;
    spy.wait_for_orders(&[id], Duration::from_secs(20)).await;
}

#[tokio::test]
async fn fault_6_terminated_backends_do_not_strand_new_orders() {
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let mut env = base_env(&db.url(), &names);
    env.insert("OUTBOX_SWEEP_INTERVAL_MS".into(), "1000".into());
    let app = TestApp::ready(env).await;
    let warm = app.client.place().await;
    spy.wait_for_orders(std::slice::from_ref(&warm), Duration::from_secs(10))
        .await;

    let listen = db.backends("order-pipeline-listen%").await;
    let pooled = db.backends("order-pipeline-pool%").await;
    assert_eq!(listen.len(), 1, "one dedicated LISTEN connection");
    assert!(!pooled.is_empty(), "pooled connections");
    db.terminate(&[listen.clone(), pooled.clone()].concat())
        .await; // checks they left pg_stat_activity

    // New orders, over HTTP and from another writer with only a NOTIFY, are
    // published by the same process (no restart) within a few sweep
    // intervals; the figure printed is the real latency (tens of ms here), the
    // bound leaves room for a loaded CI machine.
    let started = Instant::now();
    let over_http = app.client.place().await;
    let behind = insert_behind_the_service(&db, true, "order.created").await;
    spy.wait_for_orders(&[over_http, behind], Duration::from_secs(10))
        .await;
    eprintln!(
        "fault 6: published {:?} after the terminations",
        started.elapsed()
    );
    let relistened = eventually(
        "a new LISTEN connection",
        Duration::from_secs(15),
        || async {
            let now = db.backends("order-pipeline-listen%").await;
            (now.len() == 1 && now != listen).then_some(now)
        },
    )
    .await;
    assert_ne!(relistened, listen);
    app.client.wait_ready().await;
    app.stop().await;
}

/// The outbox row of an order: (attempts, last_error), if still there.
async fn outbox_row(db: &TestDb, order_id: &str) -> Option<(i32, Option<String>)> {
    let rows = db
        .client()
        .await
        .query(
            "SELECT attempts, last_error FROM outbox WHERE order_id::text = $1",
            &[&order_id],
        )
        .await
        .expect("outbox");
    rows.first().map(|r| (r.get(0), r.get(1)))
}

/// Faults 7 and 8: the broker refused the order's message (`error_word` in
/// its last error, counted under `reason`); it is still in the outbox and the
/// order still `accepted`.
async fn assert_refused_and_kept(
    app: &TestApp,
    db: &TestDb,
    id: &str,
    error_word: &str,
    reason: &str,
) {
    let (attempts, error) = eventually(
        &format!("the broker to refuse the message ({error_word})"),
        Duration::from_secs(15),
        || async { outbox_row(db, id).await.filter(|(a, _)| *a >= 1) },
    )
    .await;
    assert!(
        error.as_deref().unwrap_or_default().contains(error_word),
        "the fault: {error:?}"
    );
    assert!(attempts >= 1);
    assert_eq!(app.client.status_of(id).await.as_deref(), Some("accepted"));
    // The failure is counted once its attempt is committed: wait for it.
    let counted = format!(r#"order_pipeline_publish_failures_total{{reason="{reason}"}}"#);
    app.client
        .metrics_when(&counted, Duration::from_secs(10), |m| m.contains(&counted))
        .await;
}

/// ...and once the broker takes it, it is published and processed.
async fn assert_published_in_the_end(app: &TestApp, db: &TestDb, id: &str) {
    // Processed once the broker takes it.
    app.client.wait_processed(id, Duration::from_secs(20)).await;
    wait_outbox_drained(db, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn fault_7_an_unroutable_message_stays_in_the_outbox_until_it_is_routable() {
    let (db, names) = (TestDb::create().await, Names::new());
    let mut env = base_env(&db.url(), &names);
    env.insert("PUBLISH_RETRY_BASE_MS".into(), "200".into());
    // Retries stay frequent however long the broker admin tools take.
    env.insert("PUBLISH_RETRY_MAX_MS".into(), "1000".into());
    let app = TestApp::ready(env).await;
    let conn = amqp().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_unbind(
        names.queue.as_str().into(),
        names.exchange.as_str().into(),
        "order.#".into(),
        FieldTable::default(),
    )
    .await
    .expect("unbind");

    let id = app.client.place().await;

    assert_refused_and_kept(&app, &db, &id, "NO_ROUTE", "returned").await;

    ch.queue_bind(
        names.queue.as_str().into(),
        names.exchange.as_str().into(),
        "order.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    assert_published_in_the_end(&app, &db, &id).await;
    app.stop().await;
}

#[tokio::test]
async fn fault_7_returns_among_routed_messages_keep_exactly_the_returned_rows() {
    // lapin hands a `basic.return` to whichever confirm it resolves next, and
    // resolves a multiple ack in no fixed order: a return can come back on
    // another message's confirm. Mix returned and routed messages in every
    // batch and check that each returned row, and only those, stays.
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    db.migrate();
    insert_backlog(&db, 3000).await;
    db.execute("UPDATE outbox SET routing_key = 'nowhere.created' WHERE seq % 7 = 0")
        .await;
    let returned = db
        .texts("SELECT order_id::text FROM outbox WHERE routing_key = 'nowhere.created'")
        .await;
    let routed = db
        .texts("SELECT order_id::text FROM outbox WHERE routing_key = 'order.created'")
        .await;
    let mut env = base_env(&db.url(), &names);
    env.insert("PROCESSOR_ENABLED".into(), "false".into());
    env.insert("PUBLISH_MAX_ATTEMPTS".into(), "1000".into());
    env.insert("PUBLISH_RETRY_BASE_MS".into(), "500".into());
    env.insert("PUBLISH_RETRY_MAX_MS".into(), "500".into());
    let app = TestApp::spawn(env).await;

    spy.wait_for_orders(&routed, Duration::from_secs(60)).await;
    // Every returned row has been refused at least once (the fault happened)...
    eventually(
        "every unroutable row refused",
        Duration::from_secs(30),
        || async {
            (db.count("SELECT count(*) FROM outbox WHERE attempts = 0")
                .await
                == 0)
                .then_some(())
        },
    )
    .await;
    // ...and none of them was taken for published: still in the outbox, still
    // `accepted`, never seen.
    let kept = db.texts("SELECT order_id::text FROM outbox").await;
    let kept: std::collections::HashSet<&String> = kept.iter().collect();
    let lost: Vec<&String> = returned
        .iter()
        .filter(|id| !kept.contains(id))
        .take(5)
        .collect();
    assert!(
        lost.is_empty(),
        "returned messages counted as published (of {}): {lost:?}",
        returned.len()
    );
    assert_eq!(kept.len(), returned.len(), "only the returned rows stay");
    assert_eq!(
        db.count("SELECT count(*) FROM orders WHERE status = 'accepted'")
            .await,
        returned.len() as i64
    );
    let seen: std::collections::HashSet<String> = spy.order_ids().into_iter().collect();
    assert!(
        returned.iter().all(|id| !seen.contains(id)),
        "a returned message was delivered"
    );
    app.stop().await;
}

#[tokio::test]
async fn fault_9_a_row_that_can_never_be_a_message_is_dead_lettered_at_once() {
    // Another writer's row whose routing key AMQP cannot carry (over 255
    // bytes): it must not stop the publisher, nor wait out the retries.
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let app = TestApp::ready(base_env(&db.url(), &names)).await;
    let long_key = format!("order.{}", "x".repeat(300));
    let bad = insert_behind_the_service(&db, true, &long_key).await;
    let good: Vec<String> = [app.client.place().await, app.client.place().await].into();

    spy.wait_for_orders(&good, Duration::from_secs(15)).await;
    let error = eventually("the row dead-lettered", Duration::from_secs(10), || async {
        let rows = db
            .client()
            .await
            .query(
                "SELECT last_error FROM outbox_dead WHERE order_id::text = $1",
                &[&bad],
            )
            .await
            .ok()?;
        rows.first().map(|r| r.get::<_, Option<String>>(0))
    })
    .await;
    assert!(
        error.as_deref().unwrap_or_default().contains("255"),
        "the reason: {error:?}"
    );
    wait_outbox_drained(&db, Duration::from_secs(10)).await;
    let m = app.client.metrics().await;
    assert_eq!(
        metric(&m, "order_pipeline_stage_restarts_total"),
        0.0,
        "the publisher kept running: {m}"
    );
    app.stop().await;
}

#[tokio::test]
async fn fault_8_a_nacked_message_stays_in_the_outbox_until_the_broker_takes_it() {
    let (db, names) = (TestDb::create().await, Names::new());
    let mut env = base_env(&db.url(), &names);
    env.insert("PUBLISH_RETRY_BASE_MS".into(), "200".into());
    // Retries stay frequent however long the broker admin tools take.
    env.insert("PUBLISH_RETRY_MAX_MS".into(), "1000".into());
    let app = TestApp::ready(env).await;
    let refusing = RefusingQueue::on(&names.queue).await;

    let id = app.client.place().await;

    assert_refused_and_kept(&app, &db, &id, "nacked", "nack").await;

    refusing.lift().await;
    assert_published_in_the_end(&app, &db, &id).await;
    app.stop().await;
}

#[tokio::test]
async fn fault_9_a_poison_outbox_message_backs_off_dead_letters_and_blocks_nothing() {
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let mut env = base_env(&db.url(), &names);
    env.insert("PUBLISH_MAX_ATTEMPTS".into(), "3".into());
    env.insert("PUBLISH_RETRY_BASE_MS".into(), "200".into());
    env.insert("OUTBOX_SWEEP_INTERVAL_MS".into(), "100".into());
    env.insert("ADMIN_TOKEN".into(), "t0ken".into());
    let app = TestApp::spawn(env).await;
    let c = &app.client;
    c.wait_ready().await;

    // A message nothing routes: returned by the broker on every attempt.
    let poison = insert_behind_the_service(&db, true, "poison.unroutable").await;
    let behind: Vec<String> = {
        let mut ids = Vec::new();
        for _ in 0..10 {
            ids.push(c.place().await);
        }
        ids
    };
    spy.wait_for_orders(&behind, Duration::from_secs(15)).await;

    let dead = eventually("the poison message to be dead-lettered", Duration::from_secs(15), || async {
        let rows = db
            .client()
            .await
            .query(
                "SELECT id::text, attempts, last_error, extract(epoch FROM dead_at - created_at)::float8 \
                 FROM outbox_dead WHERE order_id::text = $1",
                &[&poison],
            )
            .await
            .ok()?;
        rows.first().map(|r| (r.get::<_, String>(0), r.get::<_, i32>(1), r.get::<_, Option<String>>(2), r.get::<_, f64>(3)))
    })
    .await;
    let (dead_id, attempts, last_error, took) = dead;
    assert_eq!(attempts, 3, "bounded attempts");
    assert!(last_error.unwrap_or_default().contains("NO_ROUTE"));
    // Three attempts 200 ms and 400 ms apart at least: backed off, not hot-looped.
    assert!(took >= 0.6, "dead-lettered after {took:.3} s: no back-off");
    // The orders behind it are seen before their confirms are recorded.
    wait_outbox_drained(&db, Duration::from_secs(10)).await;

    let auth = [("Authorization", "Bearer t0ken")];
    let get = |path: &'static str| {
        let req = c.http.get(c.url(path)).header(auth[0].0, auth[0].1);
        async move {
            req.send()
                .await
                .expect("GET")
                .json::<Value>()
                .await
                .expect("json")
        }
    };
    let summary = get("/outbox").await;
    assert_eq!(
        (summary["pending"].as_i64(), summary["dead"].as_i64()),
        (Some(0), Some(1)),
        "{summary}"
    );
    let page = get("/outbox/dead").await;
    assert_eq!(page["items"][0]["id"], dead_id.as_str(), "{page}");
    assert_eq!(page["items"][0]["attempts"], 3);
    assert!(
        page["items"][0]["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("NO_ROUTE")
    );
    let unauthorized = c
        .http
        .post(c.url(&format!("/outbox/dead/{dead_id}/requeue")))
        .send()
        .await
        .expect("POST");
    assert_eq!(unauthorized.status(), 401);

    // Made routable and requeued: published.
    let poison_spy = Spy::bound(&names.exchange, "poison.#").await;
    let r = c
        .http
        .post(c.url(&format!("/outbox/dead/{dead_id}/requeue")))
        .header(auth[0].0, auth[0].1)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 200);
    poison_spy
        .wait_for_orders(&[poison], Duration::from_secs(15))
        .await;
    assert_eq!(get("/outbox").await["dead"], 0);
    let again = c
        .http
        .post(c.url(&format!("/outbox/dead/{dead_id}/requeue")))
        .header(auth[0].0, auth[0].1)
        .send()
        .await
        .expect("POST");
    assert_eq!(again.status(), 404, "requeued once only");
    app.stop().await;
}

#[tokio::test]
async fn fault_11a_a_publisher_that_panics_is_restarted_and_publishes() {
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let faults = Arc::new(Faults::default());
    let app = TestApp::spawn_with_faults(base_env(&db.url(), &names), faults.clone()).await;
    app.client.wait_ready().await;

    faults
        .publisher_loop_panics
        .store(2, std::sync::atomic::Ordering::SeqCst);
    let id = app.client.place().await;

    spy.wait_for_orders(&[id], Duration::from_secs(15)).await;
    assert_eq!(
        faults
            .publisher_loop_panics
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the fault: both panics fired"
    );
    let restarts = metric(
        &app.client.metrics().await,
        "order_pipeline_stage_restarts_total",
    );
    assert!(restarts >= 2.0, "restarted after each panic: {restarts}");
    app.client.wait_ready().await;
    app.stop().await;
}

#[tokio::test]
async fn fault_11b_a_stage_that_dies_for_good_makes_the_process_exit_non_zero() {
    let (db, names) = (TestDb::create().await, Names::new());
    let faults = Arc::new(Faults::default());
    let mut app = TestApp::spawn_with_faults(base_env(&db.url(), &names), faults.clone()).await;
    app.client.wait_ready().await;

    // A panic inside an actix handler kills the actor; no Supervisor brings it back.
    faults
        .publisher_handler_panics
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let _ = app.client.place().await; // its commit wakes the publisher

    let code = app.exited_within(Duration::from_secs(15)).await;
    assert_eq!(
        faults
            .publisher_handler_panics
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the fault fired"
    );
    assert_eq!(
        code,
        Some(70),
        "exit non-zero so that the process supervisor restarts the service"
    );
}

#[tokio::test]
async fn fault_11c_a_publisher_that_loops_on_an_error_is_reported_and_recovers() {
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let app = TestApp::ready(base_env(&db.url(), &names)).await;
    // The outbox delete fails after every confirm: publish, fail, retry, ...
    db.execute(
        "CREATE FUNCTION refuse_delete() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'injected: outbox rows cannot be deleted'; END $$; \
         CREATE TRIGGER refuse_delete BEFORE DELETE ON outbox FOR EACH ROW EXECUTE FUNCTION refuse_delete();",
    )
    .await;

    let id = app.client.place().await;

    let (status, ready) = app
        .client
        .ready_when("the failing publisher", Duration::from_secs(10), |b| {
            b["publisher"] == "failing"
        })
        .await;
    assert_eq!(
        status, 503,
        "never a failing stage behind a healthy readiness: {ready}"
    );
    eventually(
        "the fault: the message published again and again",
        Duration::from_secs(10),
        || async { (spy.messages().len() >= 2).then_some(()) },
    )
    .await;
    // Processed despite the copies.
    app.client
        .wait_processed(&id, Duration::from_secs(10))
        .await;

    db.execute("DROP TRIGGER refuse_delete ON outbox").await;
    app.client.wait_ready().await;
    wait_outbox_drained(&db, Duration::from_secs(10)).await;
    assert_eq!(
        db.count("SELECT count(*) FROM inbox").await,
        1,
        "one effect"
    );
    app.stop().await;
}
