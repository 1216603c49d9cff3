//! A backlog of 100 000 outbox rows is published with bounded memory: the
//! publisher claims a batch at a time and never holds the table in memory.
//! A test binary of its own, so that its peak RSS and throughput are not
//! measured alongside the main suite.

#[path = "api/helpers.rs"]
mod helpers;

use std::time::{Duration, Instant};

use helpers::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

const ROWS: i64 = 100_000;
const PEAK_RSS_LIMIT_KIB: u64 = 150 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_100_000_rows_is_published_with_bounded_memory() {
    // Arrange: the tables, then 100 000 committed orders with their outbox rows.
    let (db, names) = (TestDb::create().await, Names::new());
    db.migrate();
    insert_backlog(&db, ROWS).await;
    assert_eq!(db.count("SELECT count(*) FROM outbox").await, ROWS);

    // Act: a service starts on it (processor off: the publisher is measured).
    let mut env = base_env(&db.url(), &names);
    env.insert("PROCESSOR_ENABLED".into(), "false".into());
    let mut service = ServiceProcess::new(env);
    let started = Instant::now();
    service.start();
    let pid = service.pid().expect("running");
    // VmHWM is the kernel's own high-water mark: no sample can miss the peak.
    let peak = std::sync::atomic::AtomicU64::new(0);
    let sample = || {
        if let Some((hwm, _)) = memory_kib(pid) {
            peak.fetch_max(hwm, std::sync::atomic::Ordering::Relaxed);
        }
    };
    eventually("the backlog to drain", Duration::from_secs(600), || async {
        sample();
        (db.count("SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    let took = started.elapsed();
    sample();
    let peak_kib = peak.into_inner();

    // Assert: all on the queue, published, and the peak RSS bounded.
    let conn = amqp().await;
    let ch = conn.create_channel().await.expect("channel");
    let queue = ch
        .queue_declare(
            names.queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the service's queue");
    assert!(
        i64::from(queue.message_count()) >= ROWS,
        "{} messages queued",
        queue.message_count()
    );
    assert_eq!(
        db.count("SELECT count(*) FROM orders WHERE status = 'published'")
            .await,
        ROWS
    );
    eprintln!(
        "backlog: {ROWS} rows published in {:.1} s ({:.0} msg/s, {} build), peak RSS {} MiB",
        took.as_secs_f64(),
        ROWS as f64 / took.as_secs_f64(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        peak_kib / 1024
    );
    assert!(
        peak_kib < PEAK_RSS_LIMIT_KIB,
        "peak RSS {peak_kib} KiB over {PEAK_RSS_LIMIT_KIB} KiB"
    );
}
