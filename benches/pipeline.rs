//! End-to-end benchmark: `cargo bench` (release build, real Postgres and
//! RabbitMQ on this machine, load generator in the same process, as the raw
//! limits of `../shared/STACK-NOTES.md` were measured: same 2 cores).
//!
//! Prints, for HTTP → commit → broker confirm, and for publishing a backlog:
//! throughput, latency percentiles and peak memory, each as a ratio of the raw
//! limit of this machine. Tunables: BENCH_SECONDS (15), BENCH_CLIENTS (64),
//! BENCH_BACKLOG (50000).

#[path = "../tests/api/helpers.rs"]
mod helpers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use helpers::*;

/// STACK-NOTES.md, measured here: pgbench inserting order + outbox row, one
/// per transaction, synchronous_commit on, 32 clients.
const RAW_INSERT_TPS: f64 = 4_600.0;
/// RabbitMQ, 1 KB persistent messages, 1000 confirms in flight.
const RAW_CONFIRMED_PUBLISH: f64 = 11_000.0;
/// The naive prototype (NOTIFY per order, no group commit), HTTP → confirm.
const NAIVE_PROTOTYPE: f64 = 1_600.0;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

fn self_peak_rss_mib() -> u64 {
    memory_kib(std::process::id())
        .map(|(hwm, _)| hwm / 1024)
        .unwrap_or(0)
}

async fn http_to_confirm(seconds: u64, clients: usize) {
    let (db, names) = (TestDb::create().await, Names::new());
    let mut env = base_env(&db.url(), &names);
    env.insert("RUST_LOG".into(), "warn".into());
    let app = TestApp::spawn(env).await;
    app.client.wait_ready().await;
    for _ in 0..200 {
        app.client.place().await; // warm-up: connections, caches
    }

    let latencies = Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (latencies, client) = (latencies.clone(), Client::new(app.port));
        tasks.push(tokio::spawn(async move {
            let body = good_order().to_string();
            let mut mine = Vec::new();
            let mut failed = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = client
                    .http
                    .post(client.url("/orders"))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 201 => mine.push(t.elapsed().as_micros() as u32),
                    _ => failed += 1,
                }
            }
            latencies.lock().expect("lock").extend(mine);
            failed
        }));
    }
    let mut failed = 0;
    for t in tasks {
        failed += t.await.expect("client");
    }
    let load_took = started.elapsed();
    let accepted = latencies.lock().expect("lock").len();
    let total = db.count("SELECT count(*) FROM orders").await;
    eventually("the outbox to drain", Duration::from_secs(300), || async {
        (db.count("SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    let confirmed_took = started.elapsed();
    let metrics = app.client.metrics().await;
    app.stop().await;

    let mut sorted = latencies.lock().expect("lock").clone();
    sorted.sort_unstable();
    let accept_rate = accepted as f64 / load_took.as_secs_f64();
    let e2e_rate = total as f64 / confirmed_took.as_secs_f64();
    let c2c_sum = metric(&metrics, "order_pipeline_commit_to_confirm_seconds_sum");
    let c2c_count = metric(&metrics, "order_pipeline_commit_to_confirm_seconds_count");
    println!("HTTP → commit → broker confirm ({clients} clients, {seconds} s, failures {failed})");
    println!(
        "  accepted        {accept_rate:>8.0} orders/s   {:.2}× raw insert TPS ({RAW_INSERT_TPS:.0}), {:.2}× naive prototype ({NAIVE_PROTOTYPE:.0})",
        accept_rate / RAW_INSERT_TPS,
        accept_rate / NAIVE_PROTOTYPE
    );
    println!(
        "  confirmed       {e2e_rate:>8.0} orders/s   (all {total} confirmed {:.1} s after the load began)",
        confirmed_took.as_secs_f64()
    );
    println!(
        "  POST latency    p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        percentile(&sorted, 0.50),
        percentile(&sorted, 0.99),
        percentile(&sorted, 1.0)
    );
    println!(
        "  commit→confirm  mean {:.1} ms",
        if c2c_count > 0.0 {
            1000.0 * c2c_sum / c2c_count
        } else {
            0.0
        }
    );
}

async fn backlog(rows: i64) {
    let (db, names) = (TestDb::create().await, Names::new());
    // Run the migrations, then write the backlog behind the service's back.
    let mut env = base_env(&db.url(), &names);
    env.insert("RUST_LOG".into(), "warn".into());
    env.insert("PROCESSOR_ENABLED".into(), "false".into());
    let app = TestApp::spawn(env.clone()).await;
    app.client.wait_ready().await;
    app.stop().await;
    insert_backlog(&db, rows).await;

    let started = Instant::now();
    let app = TestApp::spawn(env).await;
    eventually("the backlog to drain", Duration::from_secs(600), || async {
        (db.count("SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    let took = started.elapsed();
    app.stop().await;
    let rate = rows as f64 / took.as_secs_f64();
    println!("Backlog replay ({rows} rows, processor off)");
    println!(
        "  published       {rate:>8.0} msg/s      {:.2}× raw confirmed publish ({RAW_CONFIRMED_PUBLISH:.0}, 1000 in flight)",
        rate / RAW_CONFIRMED_PUBLISH
    );
}

fn main() {
    // `cargo test --all-targets` runs benches once as tests: only `cargo bench` measures.
    if !std::env::args().any(|a| a == "--bench") {
        println!("pipeline bench: skipped (run it with `cargo bench`)");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        http_to_confirm(
            env_or("BENCH_SECONDS", 15),
            env_or("BENCH_CLIENTS", 64) as usize,
        )
        .await;
        backlog(env_or("BENCH_BACKLOG", 50_000) as i64).await;
    });
    println!(
        "Peak RSS of the bench process (service + load generator): {} MiB",
        self_peak_rss_mib()
    );
}
