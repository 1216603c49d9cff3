//! From the outbox to the broker: backlog replay and wake-ups. The faults
//! (crashes, outages, refusals) are in `chaos`.

use std::time::Duration;

use crate::helpers::*;

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
    wait_outbox_drained(&db, Duration::from_secs(10)).await;
    app.stop().await;
}

#[tokio::test]
async fn a_notify_wakes_the_publisher_without_waiting_for_the_sweep() {
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let mut env = base_env(&db.url(), &names);
    // A sweep that never comes during this test.
    env.insert("OUTBOX_SWEEP_INTERVAL_MS".into(), "600000".into());
    let app = TestApp::ready(env).await;
    // Use up every start-up wake-up (the catch-up sweep, the one after LISTEN):
    // a notified row goes through, the outbox drains, and the publisher gets a
    // moment to go idle.
    let warm = insert_behind_the_service(&db, true, "order.created").await;
    spy.wait_for_orders(&[warm], Duration::from_secs(10)).await;
    wait_outbox_drained(&db, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let published_before = spy.messages().len();

    // Without a NOTIFY nothing wakes the publisher...
    let silent = insert_behind_the_service(&db, false, "order.created").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        spy.messages().len(),
        published_before,
        "published without any wake-up"
    );

    // ...a NOTIFY does, at once (and the earlier row goes with it).
    let notified = insert_behind_the_service(&db, true, "order.created").await;
    spy.wait_for_orders(&[silent, notified], Duration::from_secs(10))
        .await;
    app.stop().await;
}

#[tokio::test]
async fn the_timer_sweep_publishes_a_row_nobody_notified() {
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let mut env = base_env(&db.url(), &names);
    env.insert("OUTBOX_SWEEP_INTERVAL_MS".into(), "300".into());
    let app = TestApp::ready(env).await;

    let id = insert_behind_the_service(&db, false, "order.created").await;

    spy.wait_for_orders(&[id], Duration::from_secs(10)).await;
    app.stop().await;
}
