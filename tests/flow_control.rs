//! Fault 10: broker flow control. An alarm (a memory watermark set below what
//! the broker uses) makes RabbitMQ block every publishing connection of the
//! whole broker, so this is a test binary of its own: cargo runs test
//! binaries one after another, never alongside the main suite.

#[path = "api/helpers.rs"]
mod helpers;

use std::time::Duration;

use helpers::*;
use order_pipeline::pipeline::publisher::BATCHES_IN_FLIGHT;

/// Restores the broker's watermark even when the test fails.
struct Watermark(Vec<String>);

impl Watermark {
    async fn lower() -> Self {
        let current =
            rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]).await;
        let current = current.trim();
        // Either a fraction (0.4) or {absolute,Bytes}.
        let restore = match current
            .strip_prefix("{absolute,")
            .and_then(|r| r.strip_suffix('}'))
        {
            Some(bytes) => vec!["absolute".to_owned(), bytes.trim().to_owned()],
            None => vec![current.to_owned()],
        };
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.0001"]).await;
        Self(restore)
    }

    async fn restore(self) {
        let args: Vec<&str> = std::iter::once("set_vm_memory_high_watermark")
            .chain(self.0.iter().map(String::as_str))
            .collect();
        rabbitmqctl(&args).await;
        std::mem::forget(self);
    }
}

impl Drop for Watermark {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("set_vm_memory_high_watermark")
            .args(&self.0)
            .output();
    }
}

/// Concurrent clients placing orders during the test.
const WORKERS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_10_flow_control_stops_claiming_keeps_accepting_and_memory_stays_bounded() {
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let mut service = ServiceProcess::new(base_env(&db.url(), &names));
    service.start();
    service.client.wait_ready().await;
    let c = Client::new(service.port);
    let before = c.place().await;
    spy.wait_for_orders(std::slice::from_ref(&before), Duration::from_secs(10))
        .await;
    let pid = service.pid().expect("running");

    // Act: the alarm goes off while orders keep coming.
    let watermark = Watermark::lower().await;
    let load = Load::start(service.port, WORKERS);
    let (_, ready) = c
        .ready_when(
            "the broker blocked (connection.blocked)",
            Duration::from_secs(30),
            |b| b["broker"] == "blocked",
        )
        .await;
    assert_eq!(ready["publisher"], "blocked", "{ready}");
    let blocked_at = db.count("SELECT count(*) FROM outbox").await;
    let mut peak_rss_kib = 0;
    for _ in 0..10 {
        load.wait_for_more(200, Duration::from_secs(30)).await;
        let (_, rss) = memory_kib(pid).expect("/proc status");
        peak_rss_kib = peak_rss_kib.max(rss);
    }
    let pending = db.count("SELECT count(*) FROM outbox").await;
    let (status, ready) = c
        .ready_when("the broker still blocked", Duration::from_secs(10), |b| {
            b["broker"] == "blocked"
        })
        .await;
    assert_eq!(status, 200, "a blocked broker still takes orders: {ready}");
    // 2000 answered since `blocked_at` was read, less the one request per
    // worker that may have committed before it and been answered after.
    assert!(
        pending >= blocked_at + 2000 - WORKERS as i64,
        "HTTP kept accepting ({blocked_at} → {pending} pending)"
    );
    assert!(
        spy.messages().len() <= 1 + BATCHES_IN_FLIGHT * 256,
        "the publisher claimed nothing beyond its confirm window while blocked"
    );
    assert!(
        peak_rss_kib < 150 * 1024,
        "RSS {peak_rss_kib} KiB while blocked"
    );

    // The alarm clears: everything drains by itself.
    watermark.restore().await;
    let accepted = load.stop().await;
    spy.wait_for_orders(&accepted, Duration::from_secs(90))
        .await;
    wait_outbox_drained(&db, Duration::from_secs(30)).await;
    let (status, ready) = c
        .ready_when("the broker up again", Duration::from_secs(10), |b| {
            b["broker"] == "up" && b["publisher"] == "running"
        })
        .await;
    assert_eq!(status, 200);
    assert_eq!(ready["broker"], "up");
    Verdict::of(&accepted, &spy, &db)
        .await
        .assert_nothing_lost_or_unexpected();
    eprintln!(
        "fault 10: {} orders accepted while blocked ({pending} pending at most), peak RSS {} MiB",
        accepted.len(),
        peak_rss_kib / 1024
    );
}
