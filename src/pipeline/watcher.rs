//! OutboxWatcher: decides when the publisher looks at the outbox.
//!
//! - **Wakes on**: a NOTIFY on [`outbox::NOTIFY_CHANNEL`] (any writer, any
//!   process), an in-process [`Wake`] from the persist stage right after its
//!   commit (no round trip through Postgres), and a timer sweep every
//!   `OUTBOX_SWEEP_INTERVAL_MS`. Each of them sends the publisher a [`Wake`];
//!   wake-ups coalesce there. A notification is only a hint, so a lost one
//!   delays a message by at most one sweep, never strands it.
//! - **Reads/writes**: nothing but its LISTEN connection, a dedicated one (never
//!   pooled: a LISTEN session must live as long as the watcher, and its
//!   notifications queue up on the connection).
//! - **On failure**: the connection dropping ends the notification stream, and a
//!   silent one fails the periodic ping; either ends the run, and the Supervisor
//!   reconnects with capped back-off. Every (re)connect LISTENs first and then
//!   wakes the publisher for a catch-up sweep: notifications sent while nobody
//!   listened are gone.
//! - **Stops**: on [`Drain`](super::Drain), at once (it holds no work).

use std::time::Duration;

use actix::prelude::*;
use anyhow::{Context as _, bail};
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
use futures_util::StreamExt as _;
use tokio::time::{MissedTickBehavior, interval, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::publisher::PublisherActor;
use super::stage::{Connected, Stage, StageActor};
use super::{Shared, Wake};
use crate::status::{StageState, StageStatus};
use crate::storage::{self, Purpose, outbox};

/// A LISTEN connection that stopped answering (half-open socket, hung proxy)
/// would otherwise look like one that has nothing to say.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(3);

pub type OutboxWatcher = StageActor<Watcher>;

#[derive(Clone)]
pub struct Watcher {
    shared: Shared,
    publisher: Addr<PublisherActor>,
}

impl Watcher {
    pub fn new(shared: Shared, publisher: Addr<PublisherActor>) -> Self {
        Self { shared, publisher }
    }
}

/// The in-process wake-up: forwarded to the publisher.
impl Handler<Wake> for OutboxWatcher {
    type Result = ();

    fn handle(&mut self, wake: Wake, _ctx: &mut Context<Self>) {
        self.stage.publisher.do_send(wake);
    }
}

impl Stage for Watcher {
    const NAME: &'static str = "watcher";

    fn status(&self) -> &StageStatus {
        &self.shared.status.watcher
    }

    fn shared(&self) -> &Shared {
        &self.shared
    }

    async fn run(self, cancel: CancellationToken, connected: Connected) -> anyhow::Result<()> {
        // The database may not even exist before the migrations ran.
        if !self.shared.wait_migrated(&cancel).await? {
            return Ok(());
        }
        tokio::select! {
            r = self.listen(&connected) => r,
            () = self.sweep() => unreachable!("the sweep never ends"),
            () = cancel.cancelled() => Ok(()),
        }
    }
}

impl Watcher {
    /// Wakes the publisher every sweep interval.
    async fn sweep(&self) {
        let mut ticks = interval(self.shared.settings.tuning.sweep_interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.publisher.do_send(Wake);
        }
    }

    /// Connects, LISTENs, sweeps once, then forwards notifications until the
    /// connection fails.
    async fn listen(&self, connected: &Connected) -> anyhow::Result<()> {
        let url = storage::connection_url(&self.shared.settings.database_url, Purpose::Listen);
        let mut conn = timeout(
            Duration::from_secs(storage::CONNECT_TIMEOUT_SECS + 1),
            AsyncPgConnection::establish(&url),
        )
        .await
        .map_err(|_| anyhow::anyhow!("connecting the LISTEN connection timed out"))?
        .context("connecting the LISTEN connection")?;
        timeout(
            PING_TIMEOUT,
            diesel::sql_query(format!("LISTEN {}", outbox::NOTIFY_CHANNEL)).execute(&mut conn),
        )
        .await
        .map_err(|_| anyhow::anyhow!("LISTEN timed out"))?
        .context("LISTEN")?;
        self.shared.status.watcher.set(StageState::Running);
        connected.mark();
        info!(
            channel = outbox::NOTIFY_CHANNEL,
            "listening for outbox notifications"
        );
        // Registered before this sweep, so nothing committed from now on is missed.
        self.publisher.do_send(Wake);

        let mut pings = interval(PING_INTERVAL);
        pings.set_missed_tick_behavior(MissedTickBehavior::Delay);
        pings.tick().await; // the first tick is immediate
        loop {
            // The stream borrows the connection; notifications that arrive
            // while it is dropped for a ping wait in the connection's queue.
            let notification = {
                let mut notifications = std::pin::pin!(conn.notifications_stream());
                tokio::select! {
                    n = notifications.next() => Some(n),
                    _ = pings.tick() => None,
                }
            };
            match notification {
                Some(Some(Ok(n))) => {
                    debug!(from_pid = n.process_id, "outbox notification");
                    self.publisher.do_send(Wake);
                }
                Some(Some(Err(e))) => return Err(e).context("the LISTEN connection failed"),
                Some(None) => bail!("the LISTEN connection closed"),
                None => {
                    timeout(
                        PING_TIMEOUT,
                        diesel::sql_query("SELECT 1").execute(&mut conn),
                    )
                    .await
                    .map_err(|_| anyhow::anyhow!("the LISTEN connection stopped answering"))?
                    .context("pinging the LISTEN connection")?;
                    self.shared.status.watcher.beat();
                }
            }
        }
    }
}
