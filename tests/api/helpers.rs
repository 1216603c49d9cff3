//! The test harness: a fresh database and fresh broker names per test, the
//! service in-process (port 0) or as the real binary, a spy queue, a TCP proxy
//! that can cut a dependency, and polling helpers. Everything talks to the real
//! Postgres and RabbitMQ on loopback; nothing is mocked.

#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use order_pipeline::pipeline::faults::Faults;
use order_pipeline::settings::Settings;
use order_pipeline::startup::Application;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use uuid::Uuid;

pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const PG_PORT: u16 = 5432;
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const AMQP_PORT: u16 = 5672;

pub fn amqp_url_via(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

/// Polls `check` until it returns `Some`, or fails the test after `timeout`
/// saying what it waited for. Never a bare sleep.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn good_order() -> Value {
    json!({"customer_id": "c-42", "currency": "EUR",
           "items": [{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1250}]})
}

/// A one-item order of `customer`: what tests tell orders apart by.
pub fn order_of(customer: &str) -> Value {
    json!({"customer_id": customer, "currency": "EUR",
           "items": [{"sku": "a", "quantity": 1, "unit_price_cents": 1}]})
}

// ---------------------------------------------------------------- database

/// A database of its own for one test, dropped at the end (also on panic).
pub struct TestDb {
    pub name: String,
    dropped: bool,
}

impl TestDb {
    pub async fn create() -> Self {
        let name = format!("op_test_{}", &Uuid::new_v4().simple().to_string()[..12]);
        admin_client()
            .await
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create test database");
        Self {
            name,
            dropped: false,
        }
    }

    /// A name for a database that does not exist yet (the service creates it).
    pub fn unborn() -> Self {
        Self {
            name: format!("op_test_{}", &Uuid::new_v4().simple().to_string()[..12]),
            dropped: false,
        }
    }

    pub fn url(&self) -> String {
        self.url_via(PG_PORT)
    }

    pub fn url_via(&self, port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/{}", self.name)
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(conn);
        client
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .expect(sql)
            .get(0)
    }

    /// Creates the tables with the binary's own `migrate`, for tests that
    /// write a backlog before any service runs.
    pub fn migrate(&self) {
        let out = std::process::Command::new(binary())
            .arg("migrate")
            .env_clear()
            .env("DATABASE_URL", self.url())
            .env("RUST_LOG", "warn")
            .output()
            .expect("run migrate");
        assert!(
            out.status.success(),
            "migrate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The first column of every row `sql` returns, as text.
    pub async fn texts(&self, sql: &str) -> Vec<String> {
        let rows = self.client().await.query(sql, &[]).await.expect(sql);
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// Several counts read by ONE statement, so they come from one snapshot.
    pub async fn counts(&self, sql: &str) -> Vec<i64> {
        let row = self.client().await.query_one(sql, &[]).await.expect(sql);
        (0..row.len()).map(|i| row.get(i)).collect()
    }

    pub async fn execute(&self, sql: &str) {
        self.client().await.batch_execute(sql).await.expect(sql);
    }

    /// Backends of the service in this database, by application_name prefix.
    pub async fn backends(&self, application_name_like: &str) -> Vec<i32> {
        admin_client()
            .await
            .query(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name LIKE $2",
                &[&self.name, &application_name_like],
            )
            .await
            .expect("pg_stat_activity")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Terminates these backends and checks that they are gone.
    pub async fn terminate(&self, pids: &[i32]) {
        let admin = admin_client().await;
        for pid in pids {
            admin
                .query_one("SELECT pg_terminate_backend($1)", &[pid])
                .await
                .expect("pg_terminate_backend");
        }
        let pids = pids.to_vec();
        let name = self.name.clone();
        eventually("the terminated backends to leave pg_stat_activity", Duration::from_secs(10), || {
            let (pids, name) = (pids.clone(), name.clone());
            async move {
                let admin = admin_client().await;
                let left: i64 = admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid = ANY($2)",
                        &[&name, &pids],
                    )
                    .await
                    .ok()?
                    .get(0);
                (left == 0).then_some(())
            }
        })
        .await;
    }

    pub async fn drop_now(mut self) {
        drop_database(&self.name).await;
        self.dropped = true;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if !self.dropped {
            let name = self.name.clone();
            run_blocking(async move { drop_database(&name).await });
        }
    }
}

pub async fn admin_client() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(PG_ADMIN, tokio_postgres::NoTls)
        .await
        .expect("connect to postgres as admin");
    tokio::spawn(conn);
    client
}

async fn drop_database(name: &str) {
    if let Ok((client, conn)) = tokio_postgres::connect(PG_ADMIN, tokio_postgres::NoTls).await {
        tokio::spawn(conn);
        let _ = client
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await;
    }
}

/// Runs a future to completion on a runtime of its own, on another thread:
/// usable from `Drop`, inside or outside a runtime.
pub fn run_blocking<F: Future<Output = ()> + Send + 'static>(f: F) {
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(f);
        }
    })
    .join();
}

/// Writes an order and its outbox row the way another writer would (the same
/// transaction, optionally with the NOTIFY), routed with `routing_key`;
/// returns the order id.
pub async fn insert_behind_the_service(db: &TestDb, notify: bool, routing_key: &str) -> String {
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
           VALUES ('{event}', '{id}', 'order.created', '{routing_key}', 'backdoor', '{payload}'); \
         {notify} COMMIT;",
        items = order["items"],
    ))
    .await;
    id.to_string()
}

/// Writes `rows` committed orders with their outbox rows straight into the
/// database, as a backlog left by a publisher that was down.
pub async fn insert_backlog(db: &TestDb, rows: i64) {
    db.execute(&format!(
        "INSERT INTO orders (id, correlation_id, customer_id, currency, total_cents, items, created_at) \
         SELECT gen_random_uuid(), 'bulk-' || g, 'c-' || g, 'EUR', 2500, \
                '[{{\"sku\":\"SKU-1\",\"quantity\":2,\"unit_price_cents\":1250}}]', now() \
         FROM generate_series(1, {rows}) g; \
         INSERT INTO outbox (id, order_id, event_type, routing_key, correlation_id, payload) \
         SELECT o.event_id, o.id, 'order.created', 'order.created', o.correlation_id, \
                jsonb_build_object('event_id', o.event_id, 'type', 'order.created', 'occurred_at', o.created_at, \
                  'order', jsonb_build_object('id', o.id, 'status', 'accepted', 'correlation_id', o.correlation_id, \
                    'customer_id', o.customer_id, 'currency', o.currency, 'total_cents', o.total_cents, \
                    'items', o.items, 'created_at', o.created_at)) \
         FROM (SELECT gen_random_uuid() AS event_id, * FROM orders) o;"
    ))
    .await;
}

// ------------------------------------------------------------------ broker

/// Exchange and queue names of one test; deleted at the end (also on panic).
pub struct Names {
    pub exchange: String,
    pub queue: String,
}

impl Names {
    pub fn new() -> Self {
        let tag = &Uuid::new_v4().simple().to_string()[..10];
        Self {
            exchange: format!("test-orders-{tag}"),
            queue: format!("test-processor-{tag}"),
        }
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead-letter", self.queue)
    }
}

impl Default for Names {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Names {
    fn drop(&mut self) {
        let (exchange, queues) = (
            self.exchange.clone(),
            vec![self.queue.clone(), self.dead_letter_queue()],
        );
        run_blocking(async move {
            if let Ok(conn) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await {
                if let Ok(ch) = conn.create_channel().await {
                    for q in queues {
                        let _ = ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                    let _ = ch
                        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
                let _ = conn.close(200, "test done".into()).await;
            }
        });
    }
}

pub async fn amqp() -> Connection {
    Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ")
}

/// Declares the exchange as the service does (durable topic).
pub async fn declare_exchange(conn: &Connection, exchange: &str) {
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare exchange");
}

/// A message as a spy saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub routing_key: String,
    pub properties: BasicProperties,
    pub body: Value,
}

impl Seen {
    pub fn order_id(&self) -> String {
        self.body["order"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub fn message_id(&self) -> String {
        self.properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_default()
    }
}

/// An exclusive queue of the test's own, bound to an exchange: sees every
/// message published there, whatever the service's own consumer does.
pub struct Spy {
    _conn: Connection,
    seen: Arc<Mutex<Vec<Seen>>>,
    arrived: Arc<Notify>,
}

impl Spy {
    pub async fn on(exchange: &str) -> Self {
        Self::bound(exchange, "order.#").await
    }

    pub async fn bound(exchange: &str, pattern: &str) -> Self {
        let conn = amqp().await;
        declare_exchange(&conn, exchange).await;
        let ch = conn.create_channel().await.expect("channel");
        let queue = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare spy queue");
        ch.queue_bind(
            queue.name().clone(),
            exchange.into(),
            pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind spy queue");
        let mut consumer = ch
            .basic_consume(
                queue.name().clone(),
                "spy".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume spy queue");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(Notify::new());
        let (seen2, arrived2) = (seen.clone(), arrived.clone());
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let body = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
                seen2.lock().expect("lock").push(Seen {
                    routing_key: d.routing_key.to_string(),
                    properties: d.properties.clone(),
                    body,
                });
                arrived2.notify_waiters();
            }
        });
        Self {
            _conn: conn,
            seen,
            arrived,
        }
    }

    pub fn messages(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    pub fn order_ids(&self) -> Vec<String> {
        self.messages().iter().map(Seen::order_id).collect()
    }

    /// Waits until these order ids have all been seen at least once.
    pub async fn wait_for_orders(&self, ids: &[String], timeout: Duration) {
        let want: std::collections::HashSet<&String> = ids.iter().collect();
        eventually(
            &format!("{} orders on the spy queue", want.len()),
            timeout,
            || async {
                let seen: std::collections::HashSet<String> =
                    self.order_ids().into_iter().collect();
                let missing: Vec<_> = want.iter().filter(|id| !seen.contains(**id)).collect();
                missing.is_empty().then_some(())
            },
        )
        .await;
    }

    /// True if any message arrives within `within`.
    pub async fn anything_within(&self, within: Duration) -> bool {
        let before = self.messages().len();
        let _ = tokio::time::timeout(within, async {
            while self.messages().len() == before {
                tokio::time::timeout(Duration::from_millis(50), self.arrived.notified())
                    .await
                    .ok();
            }
        })
        .await;
        self.messages().len() > before
    }
}

// ----------------------------------------------------------------- service

/// The variables a test service runs with, before the test's own overrides.
pub fn base_env(db_url: &str, names: &Names) -> HashMap<String, String> {
    HashMap::from([
        ("DATABASE_URL".to_owned(), db_url.to_owned()),
        ("AMQP_URL".to_owned(), AMQP_URL.to_owned()),
        ("HTTP_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ("AMQP_EXCHANGE".to_owned(), names.exchange.clone()),
        ("AMQP_QUEUE".to_owned(), names.queue.clone()),
        (
            "RUST_LOG".to_owned(),
            std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()),
        ),
    ])
}

pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
}

impl Client {
    pub fn new(port: u16) -> Self {
        Self {
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post_order(&self, body: &Value) -> reqwest::Response {
        self.post_raw("/orders", body.to_string(), &[]).await
    }

    pub async fn post_order_with(
        &self,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        self.post_raw("/orders", body.to_string(), headers).await
    }

    pub async fn post_raw(
        &self,
        path: &str,
        body: String,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.expect("POST")
    }

    /// Places a good order and returns its id; fails the test on anything but 201.
    pub async fn place(&self) -> String {
        let r = self.post_order(&good_order()).await;
        assert_eq!(r.status(), 201, "{:?}", r.text().await);
        r.json::<Value>().await.expect("json")["id"]
            .as_str()
            .expect("id")
            .to_owned()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.expect("GET")
    }

    pub async fn status_of(&self, order_id: &str) -> Option<String> {
        let r = self
            .http
            .get(self.url(&format!("/orders/{order_id}")))
            .send()
            .await
            .ok()?;
        let v: Value = r.json().await.ok()?;
        v["status"].as_str().map(str::to_owned)
    }

    /// Waits until the order reads `processed`.
    pub async fn wait_processed(&self, order_id: &str, timeout: Duration) {
        eventually(
            &format!("order {order_id} to be processed"),
            timeout,
            || async {
                (self.status_of(order_id).await.as_deref() == Some("processed")).then_some(())
            },
        )
        .await;
    }

    pub async fn ready(&self) -> Option<(u16, Value)> {
        let r = self.http.get(self.url("/health/ready")).send().await.ok()?;
        let status = r.status().as_u16();
        Some((status, r.json().await.ok()?))
    }

    /// Waits until `/health/ready` answers a body for which `what` holds;
    /// returns its status and body.
    pub async fn ready_when(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> (u16, Value) {
        eventually(&format!("readiness to report {what}"), timeout, || async {
            self.ready().await.filter(|(_, body)| pred(body))
        })
        .await
    }

    pub async fn wait_ready(&self) {
        eventually(
            "/health/ready to answer 200",
            Duration::from_secs(30),
            || async { matches!(self.ready().await, Some((200, _))).then_some(()) },
        )
        .await;
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.text().await.unwrap_or_default()
    }

    /// Waits until the metrics text satisfies `pred` and returns it. Counters
    /// are bumped after the commit or confirm they count, so a test reads them
    /// only once they have settled.
    pub async fn metrics_when(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        eventually(&format!("metrics to show {what}"), timeout, || async {
            Some(self.metrics().await).filter(|text| pred(text))
        })
        .await
    }
}

/// Reads a counter or gauge from the metrics text (summing its label sets).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The service in-process: the real `Application` on port 0, in an actix
/// system on a thread of its own.
pub struct TestApp {
    pub client: Client,
    pub port: u16,
    shutdown: Option<order_pipeline::startup::ShutdownHandle>,
    thread: Option<std::thread::JoinHandle<i32>>,
}

impl TestApp {
    /// Spawns the service and waits until `/health/ready` answers 200.
    pub async fn ready(env: HashMap<String, String>) -> Self {
        let app = Self::spawn(env).await;
        app.client.wait_ready().await;
        app
    }

    pub async fn spawn(env: HashMap<String, String>) -> Self {
        Self::spawn_with_faults(env, Arc::default()).await
    }

    pub async fn spawn_with_faults(env: HashMap<String, String>, faults: Arc<Faults>) -> Self {
        let settings = Settings::from_vars(&env).expect("test settings are valid");
        init_test_logs(&settings);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let app = Application::build_with_faults(settings, faults)
                    .await
                    .expect("application builds");
                let _ = tx.send((app.port(), app.shutdown_handle()));
                app.run_until_stopped().await
            })
        });
        let (port, shutdown) = rx.await.expect("application started");
        Self {
            client: Client::new(port),
            port,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// Graceful shutdown; returns the exit code the binary would have.
    pub async fn stop(mut self) -> i32 {
        self.stop_inner().await
    }

    async fn stop_inner(&mut self) -> i32 {
        if let Some(s) = self.shutdown.take() {
            s.shutdown();
        }
        match self.thread.take() {
            Some(t) => tokio::task::spawn_blocking(move || t.join().unwrap_or(-1))
                .await
                .unwrap_or(-1),
            None => -1,
        }
    }

    /// Waits for the application to stop by itself; its exit code.
    pub async fn exited_within(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                return self.thread.take().map(|t| t.join().unwrap_or(-1));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            s.shutdown();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The in-process service logs through libtest's capture, so that only a
/// failing test shows them (`TEST_LOG=info` to see more than warnings).
fn init_test_logs(settings: &Settings) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&settings.log_filter))
        .with_test_writer()
        .try_init();
}

/// The real binary as a child process, logging to a file.
pub struct ServiceProcess {
    pub env: HashMap<String, String>,
    pub client: Client,
    pub port: u16,
    pub log: PathBuf,
    child: Option<Child>,
    pub pids: Vec<u32>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_order-pipeline")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl ServiceProcess {
    /// Prepares (does not start) the binary with `env`; a fixed free port so
    /// that restarts keep the address.
    pub fn new(mut env: HashMap<String, String>) -> Self {
        let port = free_port();
        env.insert("HTTP_ADDR".into(), format!("127.0.0.1:{port}"));
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let log = dir.join(format!("service-{}.log", Uuid::new_v4().simple()));
        Self {
            env,
            client: Client::new(port),
            port,
            log,
            child: None,
            pids: Vec::new(),
        }
    }

    pub fn start(&mut self) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(binary())
            .arg("serve")
            .env_clear()
            .envs(&self.env)
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .current_dir(env!("CARGO_TARGET_TMPDIR"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn the service binary");
        self.pids.push(child.id());
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub async fn wait_live(&self) {
        eventually("/health/live", Duration::from_secs(30), || async {
            let r = self
                .client
                .http
                .get(self.client.url("/health/live"))
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let status = child.wait().expect("wait");
            assert!(!status.success(), "kill -9 must not look like a clean exit");
        }
    }

    /// Sends SIGTERM and waits; the exit code and how long it took.
    pub fn term(&mut self, timeout: Duration) -> (Option<i32>, Duration) {
        let mut child = self.child.take().expect("running");
        let start = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        while start.elapsed() < timeout {
            if let Some(status) = child.try_wait().expect("wait") {
                return (status.code(), start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        (None, start.elapsed())
    }

    /// Exit code if the process has exited.
    pub fn exited(&mut self) -> Option<Option<i32>> {
        let child = self.child.as_mut()?;
        child.try_wait().ok().flatten().map(|s| s.code())
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("service log kept at {}", self.log.display());
        }
    }
}

// ------------------------------------------------------------------- proxy

/// A TCP proxy between the service and a dependency. `cut()` closes every
/// live connection and refuses new ones until `restore()`; `stall()` keeps
/// connections open but forwards nothing (a hung peer).
pub struct TcpProxy {
    pub port: u16,
    state: Arc<ProxyState>,
}

struct ProxyState {
    upstream: u16,
    up: std::sync::atomic::AtomicBool,
    stalled: std::sync::atomic::AtomicBool,
    /// Bumped by every cut: connections of an older generation close.
    generation: tokio::sync::watch::Sender<u64>,
    live: std::sync::atomic::AtomicUsize,
    accepted: std::sync::atomic::AtomicUsize,
}

impl TcpProxy {
    pub async fn start(upstream: u16) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(ProxyState {
            upstream,
            up: true.into(),
            stalled: false.into(),
            generation: tokio::sync::watch::Sender::new(0),
            live: 0.into(),
            accepted: 0.into(),
        });
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                // Subscribed before the check, so a cut that lands while the
                // upstream connect is pending is seen below.
                let generation = st.generation.subscribe();
                if !st.up.load(SeqCst) {
                    // Refused: closed at once, like a port nobody listens on.
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", st.upstream)).await else {
                    continue;
                };
                if generation.has_changed().unwrap_or(true) || !st.up.load(SeqCst) {
                    continue; // cut meanwhile: both ends close
                }
                st.accepted.fetch_add(1, SeqCst);
                let st2 = st.clone();
                tokio::spawn(async move { pump(st2, generation, client, server).await });
            }
        });
        Self { port, state }
    }

    /// Cuts every connection and refuses new ones; returns how many it cut.
    pub fn cut(&self) -> usize {
        use std::sync::atomic::Ordering::SeqCst;
        self.state.up.store(false, SeqCst);
        let live = self.state.live.load(SeqCst);
        self.state.generation.send_modify(|g| *g += 1);
        live
    }

    pub fn restore(&self) {
        self.state
            .up
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.state
            .stalled
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn stall(&self) {
        self.state
            .stalled
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn live_connections(&self) -> usize {
        self.state.live.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn accepted(&self) -> usize {
        self.state
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn pump(
    state: Arc<ProxyState>,
    mut generation: tokio::sync::watch::Receiver<u64>,
    client: TcpStream,
    server: TcpStream,
) {
    use std::sync::atomic::Ordering::SeqCst;
    state.live.fetch_add(1, SeqCst);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let st = state.clone();
    let up = async {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            while st.stalled.load(SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sw.write_all(&buf[..n]).await?;
        }
    };
    let st = state.clone();
    let down = async {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = sr.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            while st.stalled.load(SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            cw.write_all(&buf[..n]).await?;
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = generation.changed() => {}
    }
    state.live.fetch_sub(1, SeqCst);
    // Dropping the halves closes both sockets.
}

// --------------------------------------------------------- load and checks

/// Concurrent clients placing orders until stopped; remembers every order
/// answered 201. Errors are expected while a fault lasts and are only counted.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    accepted: Arc<Mutex<Vec<String>>>,
    errors: Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(port: u16, workers: usize) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks = (0..workers)
            .map(|_| {
                let (stop, accepted, errors, client) = (
                    stop.clone(),
                    accepted.clone(),
                    errors.clone(),
                    Client::new(port),
                );
                tokio::spawn(async move {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let sent = client
                            .http
                            .post(client.url("/orders"))
                            .header("content-type", "application/json")
                            .body(good_order().to_string())
                            .send()
                            .await;
                        match sent {
                            Ok(r) if r.status() == 201 => {
                                if let Ok(v) = r.json::<Value>().await {
                                    let id = v["id"].as_str().unwrap_or_default().to_owned();
                                    accepted.lock().expect("lock").push(id);
                                }
                            }
                            _ => {
                                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            accepted,
            errors,
            tasks,
        }
    }

    pub fn accepted_count(&self) -> usize {
        self.accepted.lock().expect("lock").len()
    }

    pub fn errors(&self) -> usize {
        self.errors.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `n` more orders than now have been accepted.
    pub async fn wait_for_more(&self, n: usize, timeout: Duration) {
        let target = self.accepted_count() + n;
        eventually(&format!("{target} accepted orders"), timeout, || async {
            (self.accepted_count() >= target).then_some(())
        })
        .await;
    }

    pub async fn stop(self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        self.accepted.lock().expect("lock").clone()
    }
}

/// The checker's verdict, in the vocabulary of RabbitMQ's Jepsen checker.
#[derive(Debug)]
pub struct Verdict {
    /// Answered 201, never published.
    pub lost: Vec<String>,
    /// Published, never stored.
    pub unexpected: Vec<String>,
    /// Message ids published more than once, with how many extra copies.
    pub duplicated: Vec<(String, usize)>,
}

impl Verdict {
    pub async fn of(accepted: &[String], spy: &Spy, db: &TestDb) -> Self {
        let published: std::collections::HashSet<String> = spy.order_ids().into_iter().collect();
        let stored: std::collections::HashSet<String> = db
            .client()
            .await
            .query("SELECT id::text FROM orders", &[])
            .await
            .expect("orders")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut copies: HashMap<String, usize> = HashMap::new();
        for m in spy.messages() {
            *copies.entry(m.message_id()).or_default() += 1;
        }
        Self {
            lost: accepted
                .iter()
                .filter(|id| !published.contains(*id))
                .cloned()
                .collect(),
            unexpected: published
                .iter()
                .filter(|id| !stored.contains(*id))
                .cloned()
                .collect(),
            duplicated: copies
                .into_iter()
                .filter(|(_, n)| *n > 1)
                .map(|(id, n)| (id, n - 1))
                .collect(),
        }
    }

    pub fn duplicates(&self) -> usize {
        self.duplicated.iter().map(|(_, n)| n).sum()
    }

    /// Fails with example ids when anything was lost or unexpected.
    pub fn assert_nothing_lost_or_unexpected(&self) {
        assert!(
            self.lost.is_empty(),
            "LOST: {} orders answered 201 were never published, e.g. {:?}",
            self.lost.len(),
            &self.lost[..self.lost.len().min(5)]
        );
        assert!(
            self.unexpected.is_empty(),
            "UNEXPECTED: {} published orders were never stored, e.g. {:?}",
            self.unexpected.len(),
            &self.unexpected[..self.unexpected.len().min(5)]
        );
    }
}

pub async fn wait_outbox_drained(db: &TestDb, timeout: Duration) {
    eventually("the outbox to drain", timeout, || async {
        (db.count("SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
}

/// A broker policy under which `queue` refuses every publish (`max-length`
/// 0, `reject-publish`): the broker nacks what is routed to it. Lifted by
/// [`RefusingQueue::lift`], or on drop when the test fails.
pub struct RefusingQueue {
    policy: Option<String>,
}

impl RefusingQueue {
    pub async fn on(queue: &str) -> Self {
        let policy = format!("refuse-{queue}");
        rabbitmqctl(&[
            "set_policy",
            "--apply-to",
            "queues",
            &policy,
            &format!("^{}$", queue.replace('.', "\\.")),
            r#"{"max-length":0,"overflow":"reject-publish"}"#,
        ])
        .await;
        Self {
            policy: Some(policy),
        }
    }

    pub async fn lift(mut self) {
        if let Some(policy) = self.policy.take() {
            rabbitmqctl(&["clear_policy", &policy]).await;
        }
    }
}

impl Drop for RefusingQueue {
    fn drop(&mut self) {
        if let Some(policy) = self.policy.take() {
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["clear_policy", &policy])
                .output();
        }
    }
}

/// Runs `rabbitmqctl` (the broker's own admin tool) and fails the test if it fails.
pub async fn rabbitmqctl(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(&args)
        .output()
        .await
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Peak and current resident memory of a process, in KiB (VmHWM, VmRSS).
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}
