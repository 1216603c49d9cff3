//! Application assembly: pool, migrations, one arbiter and actor per stage, the
//! HTTP server, the stage monitor and the shutdown order.
//!
//! Start-up never waits for the database or the broker: migrations run on a
//! thread of their own and retry with back-off, the stages reconnect on their
//! own, and `/health/ready` says what is still down.
//!
//! Shutdown (SIGTERM/SIGINT via [`ShutdownHandle`], or a stage that died), in
//! this order, all within [`SHUTDOWN_DEADLINE`]:
//! 1. stop the HTTP server: no new connections, in-flight requests finish
//!    (their orders are committed or refused by then);
//! 2. drain the publisher: it claims nothing new and finishes the batch in
//!    flight, confirms included; then the processor (acks what it committed)
//!    and the watcher;
//! 3. stop the arbiters. Whatever the deadline forced is logged; nothing that
//!    was answered 201 is lost either way, it is still in the outbox.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::{App, HttpServer, middleware, web};
use anyhow::Context as _;
use tokio::sync::watch;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::pipeline::faults::Faults;
use crate::pipeline::persist::{MAILBOX_CAPACITY, PersistActor};
use crate::pipeline::processor::{Processor, ProcessorActor};
use crate::pipeline::publisher::{Publisher, PublisherActor};
use crate::pipeline::stage::Backoff;
use crate::pipeline::watcher::{OutboxWatcher, Watcher};
use crate::pipeline::{Drain, Shared};
use crate::settings::Settings;
use crate::status::{StageState, StatusBoard};
use crate::storage;

/// SPEC §1: exit within 10 s of SIGTERM; this leaves a margin.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(9);
/// In-flight HTTP requests get this long to finish (their own deadline is 4.5 s).
pub const HTTP_DRAIN: Duration = Duration::from_secs(5);
/// How often the monitor checks that every stage's actor is alive.
const MONITOR_INTERVAL: Duration = Duration::from_millis(500);
/// The exit code when a stage died: the process supervisor restarts us.
pub const EXIT_STAGE_DIED: i32 = 70;

/// Asks a running [`Application`] to shut down gracefully.
#[derive(Clone)]
pub struct ShutdownHandle(CancellationToken);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.0.cancel();
    }
}

struct Stages {
    persist: Addr<PersistActor>,
    watcher: Addr<OutboxWatcher>,
    publisher: Addr<PublisherActor>,
    processor: Option<Addr<ProcessorActor>>,
}

pub struct Application {
    port: u16,
    server: actix_web::dev::Server,
    stages: Stages,
    arbiters: Vec<Arbiter>,
    status: Arc<StatusBoard>,
    shutdown: CancellationToken,
}

impl Application {
    /// Builds everything and binds `HTTP_ADDR` (port 0 picks a free port).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_with_faults(settings, Arc::default()).await
    }

    #[doc(hidden)]
    pub async fn build_with_faults(
        settings: Settings,
        faults: Arc<Faults>,
    ) -> anyhow::Result<Self> {
        let settings = Arc::new(settings);
        let status = Arc::new(StatusBoard::new(settings.processor_enabled));
        let metrics = Arc::new(Metrics::new());
        let pool = storage::build_pool(&settings.database_url, settings.tuning.db_pool_size)?;
        let shutdown = CancellationToken::new();
        let (migrated_tx, migrated) = watch::channel(false);
        spawn_migrations(
            settings.database_url.clone(),
            status.clone(),
            migrated_tx,
            shutdown.clone(),
        )?;

        let shared = Shared {
            settings: settings.clone(),
            pool: pool.clone(),
            status: status.clone(),
            metrics: metrics.clone(),
            migrated,
            faults,
        };

        // One long-lived arbiter per stage: a stage's connections live on the
        // runtime that made them and must not share it with a busy neighbour.
        let mut arbiters = Vec::new();
        let mut arbiter = || {
            let a = Arbiter::new();
            let handle = a.handle();
            arbiters.push(a);
            handle
        };

        let publisher = {
            let (shared, cancel) = (shared.clone(), shutdown.child_token());
            Supervisor::start_in_arbiter(&arbiter(), move |_| {
                PublisherActor::new(Publisher::new(shared), cancel)
            })
        };
        let watcher = {
            let (shared, cancel, publisher) =
                (shared.clone(), shutdown.child_token(), publisher.clone());
            Supervisor::start_in_arbiter(&arbiter(), move |_| {
                OutboxWatcher::new(Watcher::new(shared, publisher), cancel)
            })
        };
        let processor = settings.processor_enabled.then(|| {
            let (shared, cancel) = (shared.clone(), shutdown.child_token());
            Supervisor::start_in_arbiter(&arbiter(), move |_| {
                ProcessorActor::new(Processor::new(shared), cancel)
            })
        });
        let persist = {
            let (pool, status, metrics, tuning) = (
                pool.clone(),
                status.clone(),
                metrics.clone(),
                settings.tuning.clone(),
            );
            let wake = watcher.clone().recipient();
            PersistActor::start_in_arbiter(&arbiter(), move |ctx| {
                // HTTP handlers use try_send: a full mailbox is a 503, so it must
                // hold a burst (actix's default is 16).
                ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
                PersistActor::new(pool, wake, status, metrics, &tuning)
            })
        };

        let listener = TcpListener::bind(settings.http_addr)
            .with_context(|| format!("binding HTTP_ADDR {}", settings.http_addr))?;
        let port = listener
            .local_addr()
            .context("reading the bound address")?
            .port();
        let state = web::Data::new(AppState {
            persist: persist.clone(),
            watcher: watcher.clone(),
            pool,
            status: status.clone(),
            metrics,
            admin_token: settings.admin_token.clone(),
        });
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .wrap(middleware::from_fn(http::observe))
                .configure(http::routes)
                .default_service(web::to(http::not_found))
        })
        // Signals are main's: actix-server would stop the whole system right
        // after the HTTP workers, before the stages drained.
        .disable_signals()
        .shutdown_timeout(HTTP_DRAIN.as_secs())
        .listen(listener)
        .context("listening")?
        .run();
        info!(addr = %settings.http_addr, port, "serving HTTP");

        Ok(Self {
            port,
            server,
            stages: Stages {
                persist,
                watcher,
                publisher,
                processor,
            },
            arbiters,
            status,
            shutdown,
        })
    }

    /// The bound port (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// Serves until shutdown is asked for or a stage dies, then shuts down in
    /// order. Returns the process exit code.
    pub async fn run_until_stopped(self) -> i32 {
        let Self {
            server,
            stages,
            arbiters,
            status,
            shutdown,
            ..
        } = self;
        let server_handle = server.handle();
        let mut server_task = actix_rt::spawn(server);

        let code = tokio::select! {
            () = shutdown.cancelled() => 0,
            code = monitor(&stages, &status) => code,
            r = &mut server_task => {
                error!(result = ?r.map(|r| r.map_err(|e| e.to_string())), "the HTTP server stopped by itself");
                1
            }
        };
        info!("shutting down");
        shutdown.cancel();
        let deadline = Instant::now() + SHUTDOWN_DEADLINE;
        let mut forced = Vec::new();

        if timeout_at(deadline, server_handle.stop(true))
            .await
            .is_err()
        {
            forced.push("http");
        }
        let _ = timeout_at(deadline, &mut server_task).await;
        if timeout_at(deadline, stages.publisher.send(Drain))
            .await
            .is_err()
        {
            forced.push("publisher");
        }
        if let Some(processor) = &stages.processor
            && timeout_at(deadline, processor.send(Drain)).await.is_err()
        {
            forced.push("processor");
        }
        if timeout_at(deadline, stages.watcher.send(Drain))
            .await
            .is_err()
        {
            forced.push("watcher");
        }
        for arbiter in &arbiters {
            arbiter.stop();
        }
        if forced.is_empty() {
            info!("shut down cleanly");
        } else {
            warn!(forced = ?forced, "shutdown deadline passed; these were stopped mid-work (their outbox rows stay for the next start)");
        }
        code
    }
}

/// Resolves with [`EXIT_STAGE_DIED`] once a stage's actor is gone for good (a
/// panic in a handler): the process exits so that its supervisor restarts it,
/// rather than serving on with a dead stage.
async fn monitor(stages: &Stages, status: &StatusBoard) -> i32 {
    let mut ticks = tokio::time::interval(MONITOR_INTERVAL);
    loop {
        ticks.tick().await;
        let dead = [
            ("persist", stages.persist.connected(), None),
            ("watcher", stages.watcher.connected(), Some(&status.watcher)),
            (
                "publisher",
                stages.publisher.connected(),
                Some(&status.publisher),
            ),
            (
                "processor",
                stages.processor.as_ref().is_none_or(|p| p.connected()),
                Some(&status.processor),
            ),
        ]
        .into_iter()
        .find(|(_, alive, _)| !alive);
        if let Some((stage, _, board)) = dead {
            if let Some(board) = board {
                board.set(StageState::Dead);
            }
            error!(
                stage,
                "a pipeline stage died; exiting so that the process supervisor restarts the service"
            );
            return EXIT_STAGE_DIED;
        }
    }
}

/// Creates the database if needed and runs the migrations, retrying with
/// back-off until it works or shutdown begins. On a thread of its own:
/// diesel's migration harness blocks.
fn spawn_migrations(
    database_url: String,
    status: Arc<StatusBoard>,
    migrated: watch::Sender<bool>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("migrations".into())
        .spawn(move || {
            let mut backoff = Backoff::new();
            while !shutdown.is_cancelled() {
                // A panic must not end this thread: nothing would migrate again.
                let attempt = std::panic::catch_unwind(|| storage::migrate_blocking(&database_url))
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the migration attempt panicked")));
                match attempt {
                    Ok(applied) => {
                        info!(applied = ?applied, "database ready");
                        status.set_migrated();
                        migrated.send_replace(true);
                        return;
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "database not ready; retrying");
                        std::thread::sleep(delay);
                    }
                }
            }
        })
        .context("starting the migration thread")?;
    Ok(())
}
