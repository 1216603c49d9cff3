//! Storage: every SQL statement of the service lives in this module's children.
//!
//! Functions here take a connection and return `QueryResult`; transactions are
//! opened by the pipeline stages, which decide what belongs together. This file
//! holds what all of them share: the connection strings (with the timeouts that
//! keep a dead or hung database from hanging a caller), the pool, creating the
//! database and running the embedded migrations.

pub mod inbox;
pub mod orders;
pub mod outbox;
pub mod schema;

use std::time::Duration;

use anyhow::{Context as _, bail};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::AsyncConnection as _;
use diesel_async::AsyncPgConnection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures_util::FutureExt as _;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

pub type PgPool = Pool<AsyncPgConnection>;
pub type PooledConnection = Object<AsyncPgConnection>;

/// The TCP connect and Postgres start-up together; tokio-postgres has none by default.
pub const CONNECT_TIMEOUT_SECS: u64 = 3;
/// Server-side cap on one statement of the service. The HTTP path answers within
/// 5 s (SPEC §2); its own client-side deadline is what guarantees that, this is
/// what stops the server from working on after it.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// A transaction left open by a crashed or cancelled caller is ended by the
/// server after this long. Above the publisher's longest confirm wait.
pub const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a caller waits for a pooled connection (or for a new one to be made).
pub const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(3);

/// Checks the form of `DATABASE_URL` (SPEC §1) and returns its parsed config.
pub fn parse_database_url(url: &str) -> Result<tokio_postgres::Config, String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("must be a postgres:// or postgresql:// URL".into());
    }
    url.parse::<tokio_postgres::Config>()
        .map_err(|e| e.to_string())
}

/// What a connection is for; decides the session settings appended to the URL.
#[derive(Clone, Copy, Debug)]
pub enum Purpose {
    /// Pooled: HTTP requests and pipeline stages.
    Pool,
    /// The watcher's dedicated LISTEN connection.
    Listen,
    /// Migrations: no statement timeout (a migration may take long).
    Migrate,
}

/// `base` with the client and session options every connection of ours needs.
///
/// Why each one: `connect_timeout` because tokio-postgres waits forever by
/// default; keepalives and `tcp_user_timeout` because a half-open socket would
/// otherwise hang a query or silence LISTEN for the kernel's 2 h; the server-side
/// timeouts so that work abandoned by a client does not hold locks.
pub fn connection_url(base: &str, purpose: Purpose) -> String {
    let mut params = vec![
        (
            "connect_timeout".to_owned(),
            CONNECT_TIMEOUT_SECS.to_string(),
        ),
        ("keepalives_idle".to_owned(), "10".to_owned()),
        ("keepalives_interval".to_owned(), "5".to_owned()),
        ("keepalives_retries".to_owned(), "3".to_owned()),
        ("tcp_user_timeout".to_owned(), "15".to_owned()),
        (
            "application_name".to_owned(),
            format!("order-pipeline-{purpose:?}").to_lowercase(),
        ),
    ];
    let options = match purpose {
        Purpose::Pool | Purpose::Listen => format!(
            "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
            STATEMENT_TIMEOUT.as_millis(),
            IDLE_IN_TRANSACTION_TIMEOUT.as_millis()
        ),
        Purpose::Migrate => format!(
            "-c idle_in_transaction_session_timeout={}",
            IDLE_IN_TRANSACTION_TIMEOUT.as_millis()
        ),
    };
    params.push(("options".to_owned(), options));

    let mut url = base.to_owned();
    for (key, value) in params {
        // A value the operator put in DATABASE_URL wins.
        if url.contains(&format!("{key}=")) {
            continue;
        }
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&key);
        url.push('=');
        url.push_str(&percent_encode(&value));
    }
    url
}

fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The runtime that drives every pooled connection's socket. diesel-async
/// spawns a connection's driver task on the runtime that opened it, and the
/// pool hands connections to every stage and HTTP worker: opened on a
/// worker's runtime, a connection would die with that worker (as the HTTP
/// workers do first at shutdown, under the publisher's last batch).
fn connection_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("pg-connections")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("starting the Postgres connection runtime: {e}"))
    })
}

/// The shared pool. Connections are made lazily, so building it never fails
/// because the database is down; every wait on it is bounded. They are opened
/// on [`connection_runtime`], whoever asks for them.
pub fn build_pool(database_url: &str, size: usize) -> anyhow::Result<PgPool> {
    let mut config = ManagerConfig::<AsyncPgConnection>::default();
    config.custom_setup = Box::new(|url| {
        let url = url.to_owned();
        let opened =
            connection_runtime().spawn(async move { AsyncPgConnection::establish(&url).await });
        async move {
            opened.await.unwrap_or_else(|e| {
                Err(diesel::ConnectionError::BadConnection(format!(
                    "opening a connection: {e}"
                )))
            })
        }
        .boxed()
    });
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
        connection_url(database_url, Purpose::Pool),
        config,
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool::Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT_TIMEOUT))
        .create_timeout(Some(Duration::from_secs(CONNECT_TIMEOUT_SECS + 1)))
        .recycle_timeout(Some(Duration::from_secs(2)))
        .build()
        .context("building the Postgres pool")
}

/// Closes a pooled connection now instead of returning it to the pool. For a
/// connection whose transaction was abandoned at a deadline: the pool would
/// otherwise keep it open (and its locks held, until the server's
/// idle-in-transaction timeout) until it next hands it out.
pub fn discard(conn: PooledConnection) {
    drop(Object::take(conn));
}

/// True when an error says the database could not be reached or did not answer
/// in time, rather than that it refused what we asked: the client gets 503 and
/// may retry, and a stage backs off and reconnects.
pub fn is_unavailable(error: &DieselError) -> bool {
    match error {
        DieselError::DatabaseError(DatabaseErrorKind::UnableToSendCommand, _)
        | DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, _) => true,
        DieselError::DatabaseError(_, info) => {
            // SQLSTATE is not exposed by diesel-async; these messages are
            // Postgres's own for 57014, 57P01..57P03 and 53300.
            let m = info.message();
            m.contains("statement timeout")
                || m.contains("terminating connection")
                || m.contains("shutting down")
                || m.contains("starting up")
                || m.contains("too many clients")
                || m.contains("canceling statement")
        }
        DieselError::BrokenTransactionManager => true,
        _ => false,
    }
}

/// Creates the database named in `database_url` if it does not exist, as
/// `diesel setup` does (SPEC §4). Runs inside a tokio runtime.
pub async fn ensure_database(database_url: &str) -> anyhow::Result<()> {
    let config = parse_database_url(&connection_url(database_url, Purpose::Migrate))
        .map_err(anyhow::Error::msg)?;
    let dbname = config
        .get_dbname()
        .map(str::to_owned)
        .or_else(|| config.get_user().map(str::to_owned))
        .unwrap_or_else(|| "postgres".to_owned());

    match connect(&config).await {
        Ok(_) => return Ok(()),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) => {}
        Err(e) => return Err(e).context("connecting to Postgres"),
    }

    let mut admin = config.clone();
    admin.dbname("postgres");
    let client = connect(&admin).await.with_context(|| {
        format!("database {dbname:?} does not exist; connecting to \"postgres\" to create it")
    })?;
    let quoted = format!("\"{}\"", dbname.replace('"', "\"\""));
    match client
        .batch_execute(&format!("CREATE DATABASE {quoted}"))
        .await
    {
        Ok(()) => {
            tracing::info!(database = %dbname, "created the database");
            Ok(())
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => Ok(()),
        // Two instances creating it at the same moment: the loser trips the
        // catalog's unique index instead of getting 42P04.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => Ok(()),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            let user = config.get_user().unwrap_or("(default)");
            bail!(
                "database {dbname:?} does not exist and role {user:?} may not create it; \
                 create it (CREATE DATABASE {quoted}) or point DATABASE_URL at one that exists"
            )
        }
        Err(e) => Err(e).with_context(|| format!("creating database {dbname:?}")),
    }
}

async fn connect(
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Advisory lock key held while migrating, so that replicas starting together
/// do not run the same migration twice (advisory locks are per database).
pub const MIGRATION_LOCK_KEY: i64 = 0x6f72_6465_7273; // "orders"

/// Creates the database if needed and runs the pending embedded migrations.
///
/// Blocking: call it from a plain thread, never from inside a runtime (diesel's
/// migration harness is synchronous and `AsyncConnectionWrapper` makes its own
/// runtime; inside actix it would panic).
pub fn migrate_blocking(database_url: &str) -> anyhow::Result<Vec<String>> {
    // Multi-threaded, so that its worker drives the connection's I/O and timers
    // while this thread blocks in diesel's synchronous harness (a current-thread
    // runtime's handle cannot, and AsyncConnectionWrapper's own has no timers).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting a runtime for migrations")?;
    runtime.block_on(ensure_database(database_url))?;
    let _entered = runtime.enter();

    let url = connection_url(database_url, Purpose::Migrate);
    let mut conn =
        <AsyncConnectionWrapper<AsyncPgConnection> as diesel::Connection>::establish(&url)
            .context("connecting to Postgres to migrate")?;
    use diesel::RunQueryDsl as _;
    #[derive(diesel::QueryableByName)]
    struct Locked {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        locked: bool,
    }
    let took: Locked = diesel::sql_query(format!(
        "SELECT pg_try_advisory_lock({MIGRATION_LOCK_KEY}) AS locked"
    ))
    .get_result(&mut conn)
    .context("taking the migration lock")?;
    if !took.locked {
        // Another instance is migrating: wait for it, and say so.
        tracing::info!("another process holds the migration lock; waiting for it");
        diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
            .execute(&mut conn)
            .context("taking the migration lock")?;
    }
    let applied = conn
        .run_pending_migrations(MIGRATIONS)
        .map_err(|e| anyhow::anyhow!("running migrations: {e}"))?
        .into_iter()
        .map(|v| v.to_string())
        .collect();
    // The lock also ends with the connection; this is the tidy path.
    let _ = diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
        .execute(&mut conn);
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_url_adds_timeouts_without_overriding_the_operator() {
        let url = connection_url("postgres://u@h/db?connect_timeout=9", Purpose::Pool);
        assert!(url.contains("connect_timeout=9"));
        assert!(!url.contains("connect_timeout=3"));
        let config = parse_database_url(&url).expect("still parses");
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(9)));
        assert!(
            config
                .get_options()
                .unwrap_or("")
                .contains("statement_timeout=5000")
        );
    }

    #[test]
    fn only_postgres_urls_are_accepted() {
        assert!(parse_database_url("postgres://u@h/db").is_ok());
        assert!(parse_database_url("host=h user=u").is_err());
        assert!(parse_database_url("mysql://u@h/db").is_err());
    }
}
