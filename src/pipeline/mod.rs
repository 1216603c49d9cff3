//! The pipeline, one actix actor per stage, in the order an order travels:
//!
//! 1. [`persist`]: the HTTP handler hands it a validated order; it commits the
//!    order and its outbox row in one transaction (grouping concurrent orders
//!    into one transaction), then wakes the watcher in-process.
//! 2. [`watcher`]: LISTENs for the outbox NOTIFY on a dedicated connection and
//!    sweeps on a timer; either way it wakes the publisher.
//! 3. [`publisher`]: claims due outbox rows in batches, publishes them with
//!    confirms, and deletes a row only after the broker's ack.
//! 4. [`processor`]: consumes the queue and processes each order exactly once
//!    through the inbox table.
//!
//! The outbox table is the source of truth throughout: no mailbox or channel
//! holds anything that a crash could lose. The long-lived stages run under
//! [`stage::StageActor`], an actix `Supervisor`-ed actor that turns every
//! failure, panics included, into a restart with back-off.

pub mod faults;
pub mod persist;
pub mod processor;
pub mod publisher;
pub mod stage;
pub mod watcher;

use actix::Message;

/// There may be due outbox rows: look. Carries nothing; wake-ups coalesce.
#[derive(Clone, Copy, Debug, Message)]
#[rtype(result = "()")]
pub struct Wake;

/// Stop taking new work, finish what is in flight, then answer.
#[derive(Clone, Copy, Debug, Message)]
#[rtype(result = "()")]
pub struct Drain;

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::status::StatusBoard;
use crate::storage::PgPool;

/// What every stage is built from. Cheap to clone: handles and `Arc`s only.
#[derive(Clone)]
pub struct Shared {
    pub settings: Arc<Settings>,
    pub pool: PgPool,
    pub status: Arc<StatusBoard>,
    pub metrics: Arc<Metrics>,
    /// Turns true once the migrations have run.
    pub migrated: watch::Receiver<bool>,
    pub faults: Arc<faults::Faults>,
}

impl Shared {
    /// Waits until the tables exist: `Ok(true)`, or `Ok(false)` if cancelled
    /// first. An error means migrations will never finish (shutdown began).
    pub async fn wait_migrated(&self, cancel: &CancellationToken) -> anyhow::Result<bool> {
        let mut migrated = self.migrated.clone();
        tokio::select! {
            r = migrated.wait_for(|done| *done) => r
                .map(|_| true)
                .map_err(|_| anyhow::anyhow!("the migrations stopped before finishing")),
            () = cancel.cancelled() => Ok(false),
        }
    }
}
