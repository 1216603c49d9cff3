//! Logging: one `tracing` subscriber for the process, set up here only.
//!
//! Spans carry the fields that filter well: `order.id`, `outbox.id`,
//! `correlation_id` (per order and message), `stage` (per pipeline stage), and
//! `http.route`/`http.status` (per request). `LOG_FORMAT=json` prints one JSON
//! object per line with the current span's fields merged in.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

/// lapin logs every returned (unroutable) message at `warn`, with its whole
/// body; the publisher logs the refusal itself, once, with the ids that matter.
const QUIET: &str = "lapin::returned_messages=error";

/// Installs the global subscriber; a second call (tests) is a no-op.
pub fn init(filter: &str, format: LogFormat) {
    let filter = if filter.contains("lapin::returned_messages") {
        filter.to_owned()
    } else {
        format!("{filter},{QUIET}")
    };
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stdout().is_terminal())
            .try_init(),
    };
}

/// Panics are logged as one ERROR event (in the chosen format, so a JSON log
/// stays JSON) instead of plain text on stderr. A stage's panic is then
/// turned into a restart by its supervisor; `RUST_BACKTRACE` adds the trace.
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let backtrace = std::backtrace::Backtrace::capture();
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        match backtrace.status() {
            std::backtrace::BacktraceStatus::Captured => {
                tracing::error!(thread, backtrace = %backtrace, "panic: {info}");
            }
            _ => tracing::error!(thread, "panic: {info}"),
        }
    }));
}
