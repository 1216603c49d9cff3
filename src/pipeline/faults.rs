//! Fault injection for the test suite: lets a test make a stage panic where no
//! real input can, to prove that the supervision around it works. Only reachable
//! through [`crate::startup::Application::build_with_faults`]; the binary never
//! arms it.

use std::sync::atomic::{AtomicU32, Ordering};

#[doc(hidden)]
#[derive(Debug, Default)]
pub struct Faults {
    /// The publisher's work loop panics this many more times, once per start.
    pub publisher_loop_panics: AtomicU32,
    /// The publisher's `Wake` handler panics this many more times: a panic in
    /// an actix handler, which kills the actor for good.
    pub publisher_handler_panics: AtomicU32,
}

impl Faults {
    /// Consumes one armed fault of `counter`; true if there was one.
    pub fn take(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }
}
