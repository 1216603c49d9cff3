//! The supervised shell every long-lived stage (watcher, publisher, processor)
//! runs in.
//!
//! A stage is a [`Stage`]: a `run` future that connects, works until cancelled
//! and returns `Err` when anything fails. [`StageActor`] runs it under an actix
//! `Supervisor`:
//!
//! - `started()` starts `run` (after a back-off when this is a restart). The
//!   future runs as its own task on the actor's arbiter, so a panic inside it
//!   becomes an `Err` instead of killing the actor for good (an actix actor that
//!   panics is never restarted: the Supervisor restarts only actors that stop).
//! - An `Err` stops the actor; the Supervisor calls `restarting()` and then
//!   `started()` again, which reconnects and replays. The actix Supervisor has no
//!   back-off of its own: [`Backoff`] adds it (100 ms doubling to 5 s, reset once
//!   a run got connected).
//! - [`Drain`] cancels the run and answers once it has finished its in-flight
//!   work; the actor then idles until the system stops.

use std::cell::Cell;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument as _;

use super::Drain;
use super::Shared;
use crate::status::{StageState, StageStatus};

/// A pipeline stage that a [`StageActor`] runs.
pub trait Stage: Clone + Unpin + 'static {
    /// Names the stage in logs, metrics and `/health/ready`.
    const NAME: &'static str;

    fn status(&self) -> &StageStatus;

    fn shared(&self) -> &Shared;

    /// Connects, then works until `cancel` fires (`Ok`) or something fails
    /// (`Err`). Calls [`Connected::mark`] once it is connected and working.
    fn run(
        self,
        cancel: CancellationToken,
        connected: Connected,
    ) -> impl Future<Output = anyhow::Result<()>> + 'static;
}

/// Lets a run say that it got connected. The back-off starts from the bottom
/// again only after a run that then worked for [`HEALTHY_RUN`]: a run that
/// fails right after connecting, every time, still backs off.
pub struct Connected(Rc<Cell<Option<Instant>>>);

impl Connected {
    pub fn mark(&self) {
        self.0.set(Some(Instant::now()));
    }
}

/// How long a connected run must last for its failure to count as a new one.
pub const HEALTHY_RUN: Duration = Duration::from_secs(10);

/// True if a run that connected at `connected_at` and failed at `now` worked
/// long enough for the back-off to start over.
fn worked_long_enough(connected_at: Option<Instant>, now: Instant) -> bool {
    connected_at.is_some_and(|at| now.duration_since(at) >= HEALTHY_RUN)
}

/// Exponential back-off with jitter between restarts.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(100);
    pub const MAX: Duration = Duration::from_secs(5);

    pub fn new() -> Self {
        Self { next: Self::FIRST }
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// The delay before the next attempt: the current step with up to half of
    /// it taken off at random (so that restarts of many instances spread out).
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        step.mul_f64(1.0 - (random % 500) as f64 / 1000.0)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `work` as a task of its own on the current arbiter and turns a panic
/// inside it into an error. Dropping the returned future aborts the task.
pub async fn catch_panics<F>(work: F) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>> + 'static,
{
    match AbortOnDropHandle::new(actix_rt::spawn(work)).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => {
            let panic = e.into_panic();
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".to_owned());
            Err(anyhow::anyhow!("panicked: {message}"))
        }
        Err(e) => Err(anyhow::anyhow!("task ended: {e}")),
    }
}

pub struct StageActor<S: Stage> {
    pub(crate) stage: S,
    backoff: Backoff,
    cancel: CancellationToken,
    done: watch::Sender<bool>,
    connected: Rc<Cell<Option<Instant>>>,
    restarting: bool,
}

impl<S: Stage> StageActor<S> {
    pub fn new(stage: S, cancel: CancellationToken) -> Self {
        Self {
            stage,
            backoff: Backoff::new(),
            cancel,
            done: watch::Sender::new(false),
            connected: Rc::new(Cell::new(None)),
            restarting: false,
        }
    }

    fn finished(&mut self) {
        self.stage.status().set(StageState::Stopped);
        self.done.send_replace(true);
    }
}

impl<S: Stage> Actor for StageActor<S> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.cancel.is_cancelled() {
            self.finished();
            return;
        }
        let delay = if std::mem::take(&mut self.restarting) {
            if worked_long_enough(self.connected.take(), Instant::now()) {
                self.backoff.reset();
            }
            self.backoff.next_delay()
        } else {
            Duration::ZERO
        };
        let stage = self.stage.clone();
        let cancel = self.cancel.clone();
        let connected = Connected(self.connected.clone());
        let work = async move {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.cancelled() => return Ok(()),
            }
            let span = tracing::info_span!("stage", stage = S::NAME);
            catch_panics(stage.run(cancel, connected).instrument(span)).await
        };
        ctx.spawn(work.into_actor(self).map(|result, act, ctx| match result {
            Ok(()) => act.finished(),
            Err(e) if act.cancel.is_cancelled() => {
                tracing::warn!(stage = S::NAME, error = %format!("{e:#}"), "stage failed while draining");
                act.finished();
            }
            Err(e) => {
                tracing::warn!(
                    stage = S::NAME,
                    error = %format!("{e:#}"),
                    "stage failed; restarting after back-off"
                );
                ctx.stop();
            }
        }));
    }
}

impl<S: Stage> Supervised for StageActor<S> {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.restarting = true;
        self.stage.shared().metrics.stage_restarted(S::NAME);
        self.stage.status().set(StageState::Restarting);
    }
}

impl<S: Stage> Handler<Drain> for StageActor<S> {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Drain, _ctx: &mut Context<Self>) -> Self::Result {
        if !*self.done.borrow() {
            self.stage.status().set(StageState::Draining);
        }
        self.cancel.cancel();
        let mut done = self.done.subscribe();
        Box::pin(async move {
            let _ = done.wait_for(|finished| *finished).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_run_that_worked_for_a_while_resets_the_backoff() {
        let now = Instant::now() + HEALTHY_RUN * 2;
        assert!(!worked_long_enough(None, now), "never connected");
        assert!(
            !worked_long_enough(Some(now - Duration::from_millis(50)), now),
            "failed right after connecting"
        );
        assert!(worked_long_enough(Some(now - HEALTHY_RUN), now));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(first <= Backoff::FIRST && first >= Backoff::FIRST / 2);
        for _ in 0..20 {
            assert!(b.next_delay() <= Backoff::MAX);
        }
        assert!(b.next_delay() >= Backoff::MAX / 2);
        b.reset();
        assert!(b.next_delay() <= Backoff::FIRST);
    }
}
