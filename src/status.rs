//! The status board: what each stage reports about itself, read by
//! `/health/ready` and by the stage monitor in `startup`.
//!
//! Stages write their state as it changes and beat while they work. A stage
//! whose actor is gone, or that says it is running but has not beaten for
//! [`STALL_AFTER`], is reported, so a dead stage never hides behind a healthy
//! readiness answer.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// A running stage beats at least once per sweep interval or confirm wait; one
/// that has been silent this long is stuck.
pub const STALL_AFTER: Duration = Duration::from_secs(90);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    Starting,
    Running,
    /// Lost its connection; its supervisor restarts it after a back-off.
    Restarting,
    /// Broker flow control: connected but not allowed to publish.
    Blocked,
    /// Connected, but its work keeps failing (e.g. the database refuses the
    /// outbox writes); retrying with back-off.
    Failing,
    /// Shutting down: finishing in-flight work, claiming nothing new.
    Draining,
    Stopped,
    Disabled,
    /// Running by its own account but silent for too long.
    Stalled,
    /// Its actor is gone; the process exits so that its supervisor restarts it.
    Dead,
}

impl StageState {
    /// Whether this state lets the service call itself ready.
    pub fn is_healthy(self) -> bool {
        matches!(self, Self::Running | Self::Blocked | Self::Disabled)
    }
}

pub struct StageStatus {
    state: Mutex<StageState>,
    last_beat_ms: AtomicI64,
}

impl StageStatus {
    fn new(state: StageState) -> Self {
        Self {
            state: Mutex::new(state),
            last_beat_ms: AtomicI64::new(0),
        }
    }

    pub fn set(&self, state: StageState) {
        *lock(&self.state) = state;
        self.beat();
    }

    pub fn beat(&self) {
        self.last_beat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// The state, with a silent "running" stage reported as stalled.
    pub fn get(&self) -> StageState {
        let state = *lock(&self.state);
        let silent = now_ms() - self.last_beat_ms.load(Ordering::Relaxed);
        if state == StageState::Running && silent > STALL_AFTER.as_millis() as i64 {
            StageState::Stalled
        } else {
            state
        }
    }
}

/// A poisoned lock still holds a valid state: a plain value, written whole.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_ms() -> i64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as i64
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokerState {
    Up,
    Down,
    /// Connected, but the broker is refusing publishes (`connection.blocked`).
    Blocked,
    /// Reachable, but it refuses the exchange or queue as configured (a
    /// `PRECONDITION_FAILED` on declare, e.g. an exchange of another type).
    Misconfigured,
}

pub struct StatusBoard {
    /// Set once the embedded migrations have run; nothing touches the tables before.
    migrated: AtomicBool,
    broker: Mutex<BrokerState>,
    pub publisher: StageStatus,
    pub watcher: StageStatus,
    pub processor: StageStatus,
}

impl StatusBoard {
    pub fn new(processor_enabled: bool) -> Self {
        Self {
            migrated: AtomicBool::new(false),
            broker: Mutex::new(BrokerState::Down),
            publisher: StageStatus::new(StageState::Starting),
            watcher: StageStatus::new(StageState::Starting),
            processor: StageStatus::new(if processor_enabled {
                StageState::Starting
            } else {
                StageState::Disabled
            }),
        }
    }

    pub fn migrated(&self) -> bool {
        self.migrated.load(Ordering::Acquire)
    }

    pub fn set_migrated(&self) {
        self.migrated.store(true, Ordering::Release);
    }

    pub fn broker(&self) -> BrokerState {
        *lock(&self.broker)
    }

    pub fn set_broker(&self, state: BrokerState) {
        *lock(&self.broker) = state;
    }

    pub fn stages(&self) -> [(&'static str, &StageStatus); 3] {
        [
            ("publisher", &self.publisher),
            ("watcher", &self.watcher),
            ("processor", &self.processor),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_running_stage_reads_as_stalled() {
        let stage = StageStatus::new(StageState::Starting);
        stage.set(StageState::Failing);
        assert_eq!(stage.get(), StageState::Failing);
        stage.set(StageState::Running);
        assert_eq!(stage.get(), StageState::Running);
        stage.last_beat_ms.store(
            now_ms() - STALL_AFTER.as_millis() as i64 - 1,
            Ordering::Relaxed,
        );
        assert_eq!(stage.get(), StageState::Stalled);
        assert!(!StageState::Stalled.is_healthy() && !StageState::Failing.is_healthy());
    }
}
