//! Settings: the environment (SPEC §1) turned into one validated struct.
//!
//! Every variable has a working local default. A variable with an invalid value
//! is a [`SettingsError`] that names it; `main` prints it on one line and exits 2
//! before any port is bound or any connection is tried. Secrets (the admin token,
//! passwords inside URLs) never reach a log line: `Debug` redacts them.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

/// The environment variables of SPEC §1 and their defaults.
pub mod defaults {
    pub const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/orders";
    pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
    pub const HTTP_ADDR: &str = "127.0.0.1:8080";
    pub const AMQP_EXCHANGE: &str = "orders";
    pub const AMQP_QUEUE: &str = "order-processor";
    pub const RUST_LOG: &str = "info";
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Knobs beyond SPEC §1. Each has an environment variable (named on the field)
/// so that operators and fault tests can tighten them; the defaults are what
/// production should run with.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// `OUTBOX_SWEEP_INTERVAL_MS` (default 1000): how often the watcher wakes the
    /// publisher without a notification. The longest a lost NOTIFY delays a
    /// message, and the granularity of retry back-off.
    pub sweep_interval: Duration,
    /// `PUBLISH_BATCH_SIZE` (default 256): outbox rows claimed per batch. Two
    /// batches are in flight at once (one confirming, one recording).
    pub publish_batch_size: i64,
    /// `PUBLISH_MAX_ATTEMPTS` (default 300): broker refusals (nack or return)
    /// after which a message is dead-lettered. With the default back-off that
    /// is about a day of refusals: a topology outage (a queue deleted or
    /// unbound) of hours dead-letters nothing.
    pub publish_max_attempts: i32,
    /// `PUBLISH_RETRY_BASE_MS` (default 500): back-off after the first refusal;
    /// doubles per attempt, capped at `PUBLISH_RETRY_MAX_MS` (default 300000).
    pub publish_retry_base: Duration,
    pub publish_retry_max: Duration,
    /// `PUBLISH_CONFIRM_TIMEOUT_MS` (default 10000, at most 50000): how long a
    /// batch waits for its confirms before its unconfirmed messages count as
    /// "not published". The batch's transaction idles meanwhile, so this plus
    /// the blocked-broker grace stays below the session's idle-in-transaction
    /// timeout.
    pub confirm_timeout: Duration,
    /// `PROCESSOR_PREFETCH` (default 256): unacked deliveries the processor holds.
    pub processor_prefetch: u16,
    /// `DB_POOL_SIZE` (default 16): pooled Postgres connections.
    pub db_pool_size: usize,
    /// `PERSIST_MAX_BATCH` (default 128): orders committed in one transaction.
    pub persist_max_batch: usize,
    /// `PERSIST_MAX_TRANSACTIONS` (default 4): persist transactions in flight.
    pub persist_max_transactions: usize,
    /// `IDEMPOTENCY_KEY_TTL_HOURS` (default 24): how long a key is remembered.
    pub idempotency_key_ttl: Duration,
}

/// The longest `PUBLISH_CONFIRM_TIMEOUT_MS`: with the publisher's 60 s grace
/// for a blocked broker it stays below the 120 s idle-in-transaction timeout.
pub const MAX_CONFIRM_TIMEOUT_MS: u64 = 50_000;

/// Appended to `AMQP_QUEUE` for the processor's dead-letter queue.
const DEAD_LETTER_SUFFIX: &str = ".dead-letter";

impl Default for Tuning {
    fn default() -> Self {
        Self {
            sweep_interval: Duration::from_millis(1000),
            publish_batch_size: 256,
            publish_max_attempts: 300,
            publish_retry_base: Duration::from_millis(500),
            publish_retry_max: Duration::from_secs(300),
            confirm_timeout: Duration::from_secs(10),
            processor_prefetch: 256,
            db_pool_size: 16,
            persist_max_batch: 128,
            persist_max_transactions: 4,
            idempotency_key_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Clone)]
pub struct Settings {
    pub database_url: String,
    pub amqp_url: String,
    pub http_addr: SocketAddr,
    pub amqp_exchange: String,
    pub amqp_queue: String,
    pub processor_enabled: bool,
    /// `None`: the admin endpoints answer 404.
    pub admin_token: Option<String>,
    pub log_filter: String,
    pub log_format: LogFormat,
    pub tuning: Tuning,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid {variable}: {reason}")]
pub struct SettingsError {
    pub variable: &'static str,
    pub reason: String,
}

fn invalid(variable: &'static str, reason: impl Into<String>) -> SettingsError {
    SettingsError {
        variable,
        reason: reason.into(),
    }
}

impl Settings {
    /// Reads the process environment, after a `.env` in the working directory
    /// (variables already set win over the file).
    pub fn from_env() -> Result<Self, SettingsError> {
        match dotenvy::from_path(".env") {
            Ok(()) => {}
            Err(e) if e.not_found() => {}
            Err(e) => return Err(invalid("(.env file)", e.to_string())),
        }
        Self::from_vars(&std::env::vars().collect())
    }

    /// Builds settings from a variable map; what `from_env` and tests share.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, SettingsError> {
        let get = |name: &str, default: &str| -> String {
            vars.get(name)
                .cloned()
                .unwrap_or_else(|| default.to_owned())
        };

        let database_url = get("DATABASE_URL", defaults::DATABASE_URL);
        crate::storage::parse_database_url(&database_url)
            .map_err(|e| invalid("DATABASE_URL", e))?;

        let amqp_url = get("AMQP_URL", defaults::AMQP_URL);
        lapin::uri::AMQPUri::from_str(&amqp_url).map_err(|e| invalid("AMQP_URL", e))?;

        let http_addr = get("HTTP_ADDR", defaults::HTTP_ADDR);
        let http_addr = http_addr.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "HTTP_ADDR",
                format!("{http_addr:?} is not an address like 127.0.0.1:8080"),
            )
        })?;

        let amqp_exchange = amqp_name(
            "AMQP_EXCHANGE",
            get("AMQP_EXCHANGE", defaults::AMQP_EXCHANGE),
            255,
        )?;
        // Room for the dead-letter queue's suffix within AMQP's 255 bytes.
        let amqp_queue = amqp_name(
            "AMQP_QUEUE",
            get("AMQP_QUEUE", defaults::AMQP_QUEUE),
            255 - DEAD_LETTER_SUFFIX.len(),
        )?;

        let processor_enabled = match vars.get("PROCESSOR_ENABLED").map(String::as_str) {
            None => true,
            Some(v) => parse_bool(v).ok_or_else(|| {
                invalid("PROCESSOR_ENABLED", format!("{v:?} is not true or false"))
            })?,
        };

        let admin_token = match vars.get("ADMIN_TOKEN") {
            None => None,
            Some(t) if t.trim().is_empty() => {
                return Err(invalid(
                    "ADMIN_TOKEN",
                    "is set but empty; unset it to disable admin endpoints",
                ));
            }
            Some(t) => Some(t.clone()),
        };

        let log_filter = get("RUST_LOG", defaults::RUST_LOG);
        tracing_subscriber::EnvFilter::try_new(&log_filter)
            .map_err(|e| invalid("RUST_LOG", e.to_string()))?;

        let log_format = match get("LOG_FORMAT", "text").as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "LOG_FORMAT",
                    format!("{other:?} is not text or json"),
                ));
            }
        };

        let d = Tuning::default();
        let millis = |name: &'static str, default: Duration| -> Result<Duration, SettingsError> {
            number::<u64>(
                vars,
                name,
                default.as_millis() as u64,
                1..=u64::from(u32::MAX),
            )
            .map(Duration::from_millis)
        };
        let tuning = Tuning {
            sweep_interval: millis("OUTBOX_SWEEP_INTERVAL_MS", d.sweep_interval)?,
            publish_batch_size: number(
                vars,
                "PUBLISH_BATCH_SIZE",
                d.publish_batch_size,
                1..=10_000,
            )?,
            publish_max_attempts: number(
                vars,
                "PUBLISH_MAX_ATTEMPTS",
                d.publish_max_attempts,
                1..=100_000,
            )?,
            publish_retry_base: millis("PUBLISH_RETRY_BASE_MS", d.publish_retry_base)?,
            publish_retry_max: millis("PUBLISH_RETRY_MAX_MS", d.publish_retry_max)?,
            confirm_timeout: number::<u64>(
                vars,
                "PUBLISH_CONFIRM_TIMEOUT_MS",
                d.confirm_timeout.as_millis() as u64,
                1..=MAX_CONFIRM_TIMEOUT_MS,
            )
            .map(Duration::from_millis)?,
            processor_prefetch: number(
                vars,
                "PROCESSOR_PREFETCH",
                d.processor_prefetch,
                1..=u16::MAX,
            )?,
            db_pool_size: number(vars, "DB_POOL_SIZE", d.db_pool_size, 4..=1000)?,
            persist_max_batch: number(vars, "PERSIST_MAX_BATCH", d.persist_max_batch, 1..=10_000)?,
            persist_max_transactions: number(
                vars,
                "PERSIST_MAX_TRANSACTIONS",
                d.persist_max_transactions,
                1..=64,
            )?,
            idempotency_key_ttl: number(vars, "IDEMPOTENCY_KEY_TTL_HOURS", 24u64, 24..=24 * 365)
                .map(|h| Duration::from_secs(h * 3600))?,
        };
        if tuning.persist_max_transactions + 2 > tuning.db_pool_size {
            return Err(invalid(
                "DB_POOL_SIZE",
                "must exceed PERSIST_MAX_TRANSACTIONS by at least 2 (publisher and reads)",
            ));
        }

        Ok(Self {
            database_url,
            amqp_url,
            http_addr,
            amqp_exchange,
            amqp_queue,
            processor_enabled,
            admin_token,
            log_filter,
            log_format,
            tuning,
        })
    }

    /// The dead-letter queue of the order processor: poison deliveries go there.
    pub fn processor_dead_letter_queue(&self) -> String {
        format!("{}{DEAD_LETTER_SUFFIX}", self.amqp_queue)
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn number<T>(
    vars: &HashMap<String, String>,
    name: &'static str,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, SettingsError>
where
    T: FromStr + PartialOrd + fmt::Display + Copy,
{
    let Some(raw) = vars.get(name) else {
        return Ok(default);
    };
    match raw.trim().parse::<T>() {
        Ok(v) if range.contains(&v) => Ok(v),
        _ => Err(invalid(
            name,
            format!(
                "{raw:?} is not a whole number in {}..={}",
                range.start(),
                range.end()
            ),
        )),
    }
}

/// Exchange and queue names are AMQP short strings (at most `max` bytes
/// here); `amq.` is reserved.
fn amqp_name(variable: &'static str, value: String, max: usize) -> Result<String, SettingsError> {
    if value.is_empty() || value.len() > max {
        return Err(invalid(variable, format!("must be 1..={max} bytes")));
    }
    if value.starts_with("amq.") {
        return Err(invalid(
            variable,
            "names starting with \"amq.\" are reserved by the broker",
        ));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(invalid(
            variable,
            format!("{value:?} may only contain letters, digits, '-', '_', '.' and ':'"),
        ));
    }
    Ok(value)
}

/// Replaces the password of a `scheme://user:password@host` URL by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("database_url", &redact_url(&self.database_url))
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("http_addr", &self.http_addr)
            .field("amqp_exchange", &self.amqp_exchange)
            .field("amqp_queue", &self.amqp_queue)
            .field("processor_enabled", &self.processor_enabled)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "***"))
            .field("log_filter", &self.log_filter)
            .field("log_format", &self.log_format)
            .field("tuning", &self.tuning)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn every_variable_has_a_working_default() {
        let s = Settings::from_vars(&HashMap::new()).expect("defaults are valid");
        assert_eq!(s.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.amqp_exchange, "orders");
        assert_eq!(s.amqp_queue, "order-processor");
        assert!(s.processor_enabled);
        assert!(s.admin_token.is_none());
        assert_eq!(s.log_format, LogFormat::Text);
    }

    #[test]
    fn an_invalid_value_names_its_variable() {
        for (name, value) in [
            ("HTTP_ADDR", "not-an-address"),
            ("DATABASE_URL", "mysql://nope"),
            ("AMQP_URL", "http://x"),
            ("AMQP_EXCHANGE", ""),
            ("AMQP_QUEUE", "amq.reserved"),
            ("AMQP_QUEUE", &"q".repeat(244)),
            ("AMQP_EXCHANGE", &"x".repeat(256)),
            ("PROCESSOR_ENABLED", "maybe"),
            ("ADMIN_TOKEN", " "),
            ("LOG_FORMAT", "xml"),
            ("PUBLISH_BATCH_SIZE", "0"),
            ("PUBLISH_CONFIRM_TIMEOUT_MS", "50001"),
            ("OUTBOX_SWEEP_INTERVAL_MS", "soon"),
        ] {
            let err = Settings::from_vars(&vars(&[(name, value)])).expect_err(name);
            assert_eq!(err.variable, name);
            assert!(err.to_string().contains(name), "{err}");
        }
        let longest = "q".repeat(243);
        let s = Settings::from_vars(&vars(&[("AMQP_QUEUE", &longest)])).expect("243 bytes fit");
        assert_eq!(s.processor_dead_letter_queue().len(), 255);
    }

    #[test]
    fn debug_output_hides_secrets() {
        let s = Settings::from_vars(&vars(&[
            ("ADMIN_TOKEN", "s3cret"),
            ("AMQP_URL", "amqp://user:hunter2@host:5672/%2f"),
        ]))
        .expect("valid");
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
