//! The status board: what each stage reports about itself, read by
//! `/health/ready` and by the stage monitor in `startup`.
//!
//! Stages write their state as it changes and beat while they work. A stage
//! whose actor is gone, or that says it is running but has not beaten for
//! [`STALL_AFTER`], is reported, so a dead stage never hides behind a healthy
//! readiness answer.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};
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
    fn from_u8(v: u8) -> Self {
        use StageState::*;
        [
            Starting, Running, Restarting, Blocked, Draining, Stopped, Disabled, Stalled, Dead,
        ]
        .get(v as usize)
        .copied()
        .unwrap_or(Dead)
    }

    /// Whether this state lets the service call itself ready.
    pub fn is_healthy(self) -> bool {
        matches!(self, Self::Running | Self::Blocked | Self::Disabled)
    }
}

pub struct StageStatus {
    state: AtomicU8,
    last_beat_ms: AtomicI64,
}

impl StageStatus {
    fn new(state: StageState) -> Self {
        Self {
            state: AtomicU8::new(state as u8),
            last_beat_ms: AtomicI64::new(0),
        }
    }

    pub fn set(&self, state: StageState) {
        self.state.store(state as u8, Ordering::Relaxed);
        self.beat();
    }

    pub fn beat(&self) {
        self.last_beat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// The state, with a silent "running" stage reported as stalled.
    pub fn get(&self) -> StageState {
        let state = StageState::from_u8(self.state.load(Ordering::Relaxed));
        let silent = now_ms() - self.last_beat_ms.load(Ordering::Relaxed);
        if state == StageState::Running && silent > STALL_AFTER.as_millis() as i64 {
            StageState::Stalled
        } else {
            state
        }
    }
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
}

pub struct StatusBoard {
    /// Set once the embedded migrations have run; nothing touches the tables before.
    migrated: AtomicBool,
    broker: AtomicU8,
    pub publisher: StageStatus,
    pub watcher: StageStatus,
    pub processor: StageStatus,
}

impl StatusBoard {
    pub fn new(processor_enabled: bool) -> Self {
        Self {
            migrated: AtomicBool::new(false),
            broker: AtomicU8::new(BrokerState::Down as u8),
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
        match self.broker.load(Ordering::Relaxed) {
            0 => BrokerState::Up,
            2 => BrokerState::Blocked,
            _ => BrokerState::Down,
        }
    }

    pub fn set_broker(&self, state: BrokerState) {
        self.broker.store(state as u8, Ordering::Relaxed);
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
    fn states_round_trip_through_their_byte() {
        use StageState::*;
        for s in [
            Starting, Running, Restarting, Blocked, Draining, Stopped, Disabled, Stalled, Dead,
        ] {
            assert_eq!(StageState::from_u8(s as u8), s);
        }
        let board = StatusBoard::new(true);
        for b in [BrokerState::Up, BrokerState::Down, BrokerState::Blocked] {
            board.set_broker(b);
            assert_eq!(board.broker(), b);
        }
    }
}
