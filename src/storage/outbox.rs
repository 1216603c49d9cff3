//! The `outbox` and `outbox_dead` tables.
//!
//! A row in `outbox` is a message the broker has not confirmed yet. It leaves the
//! table in exactly two ways: deleted in the transaction that records its
//! broker confirm, or moved to `outbox_dead` after too many refusals.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Double, Integer, Nullable, Text, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::schema::{outbox, outbox_dead};

/// The NOTIFY channel the watcher LISTENs on. The payload is always empty: a
/// notification is a hint to look at the table, never the data.
pub const NOTIFY_CHANNEL: &str = "order_pipeline_outbox";

#[derive(Debug, Insertable)]
#[diesel(table_name = outbox)]
pub struct NewOutboxRow<'a> {
    pub id: Uuid,
    pub order_id: Uuid,
    pub event_type: &'static str,
    pub routing_key: &'static str,
    pub correlation_id: &'a str,
    pub payload: serde_json::Value,
}

/// A claimed outbox row: what the publisher needs to send it.
#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = outbox, check_for_backend(diesel::pg::Pg))]
pub struct OutboxMessage {
    pub id: Uuid,
    pub order_id: Uuid,
    pub event_type: String,
    pub routing_key: String,
    pub correlation_id: String,
    pub payload: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub attempts: i32,
}

pub async fn insert(conn: &mut AsyncPgConnection, rows: &[NewOutboxRow<'_>]) -> QueryResult<usize> {
    diesel::insert_into(outbox::table)
        .values(rows)
        .execute(conn)
        .await
}

/// Signals the watchers of every process; delivered only if the surrounding
/// transaction commits. Postgres folds identical notifications of one
/// transaction into one, but call it once per transaction anyway: a notifying
/// commit holds a cluster-wide lock until its WAL is flushed.
pub async fn notify(conn: &mut AsyncPgConnection) -> QueryResult<usize> {
    diesel::sql_query(format!("NOTIFY {NOTIFY_CHANNEL}"))
        .execute(conn)
        .await
}

/// Locks and returns up to `limit` due rows, oldest first. Rows locked by
/// another claimer are skipped, not waited for; a row in back-off is not due,
/// so a failing message never holds up those behind it. The locks last as long
/// as the caller's transaction, and end with its session if the process dies.
pub async fn claim_due(
    conn: &mut AsyncPgConnection,
    limit: i64,
) -> QueryResult<Vec<OutboxMessage>> {
    outbox::table
        .filter(outbox::next_attempt_at.le(diesel::dsl::now))
        .order(outbox::seq)
        .limit(limit)
        .select(OutboxMessage::as_select())
        .for_update()
        .skip_locked()
        .load(conn)
        .await
}

/// Deletes confirmed messages: one statement for a whole batch.
pub async fn delete(conn: &mut AsyncPgConnection, ids: &[Uuid]) -> QueryResult<usize> {
    if ids.is_empty() {
        return Ok(0);
    }
    diesel::delete(outbox::table.filter(outbox::id.eq_any(ids)))
        .execute(conn)
        .await
}

/// Records one more refusal for each `(id, error)` and pushes the row's next
/// attempt back exponentially: `base · 2^attempts`, at most `max`.
pub async fn record_refusals(
    conn: &mut AsyncPgConnection,
    refusals: &[(Uuid, String)],
    base: Duration,
    max: Duration,
) -> QueryResult<usize> {
    if refusals.is_empty() {
        return Ok(0);
    }
    let (ids, errors): (Vec<Uuid>, Vec<String>) = refusals.iter().cloned().unzip();
    diesel::sql_query(
        "UPDATE outbox o SET attempts = o.attempts + 1, last_error = f.error, \
             next_attempt_at = clock_timestamp() + make_interval(secs => \
                 least($3 * power(2, least(o.attempts, 40)), $4) / 1000.0) \
         FROM unnest($1::uuid[], $2::text[]) AS f(id, error) WHERE o.id = f.id",
    )
    .bind::<Array<SqlUuid>, _>(&ids)
    .bind::<Array<Text>, _>(&errors)
    .bind::<Double, _>(base.as_millis() as f64)
    .bind::<Double, _>(max.as_millis() as f64)
    .execute(conn)
    .await
}

/// Moves those of `ids` that have been refused `max_attempts` times to
/// `outbox_dead`; returns the ids it moved.
pub async fn dead_letter_exhausted(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
    max_attempts: i32,
) -> QueryResult<Vec<Uuid>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    #[derive(QueryableByName)]
    struct Moved {
        #[diesel(sql_type = SqlUuid)]
        id: Uuid,
    }
    let moved: Vec<Moved> = diesel::sql_query(
        "WITH moved AS (DELETE FROM outbox WHERE id = ANY($1) AND attempts >= $2 \
             RETURNING id, order_id, event_type, routing_key, correlation_id, payload, \
                       created_at, attempts, last_error) \
         INSERT INTO outbox_dead (id, order_id, event_type, routing_key, correlation_id, payload, \
                                  created_at, attempts, last_error) \
         SELECT id, order_id, event_type, routing_key, correlation_id, payload, created_at, \
                attempts, last_error FROM moved \
         RETURNING id",
    )
    .bind::<Array<SqlUuid>, _>(ids)
    .bind::<Integer, _>(max_attempts)
    .load(conn)
    .await?;
    Ok(moved.into_iter().map(|m| m.id).collect())
}

/// The backlog as operators see it (`GET /outbox`, `/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, QueryableByName, serde::Serialize)]
pub struct Summary {
    #[diesel(sql_type = BigInt)]
    pub pending: i64,
    /// Seconds since the oldest pending message committed; `None` when empty.
    #[diesel(sql_type = Nullable<Double>)]
    pub oldest_pending_age_seconds: Option<f64>,
    #[diesel(sql_type = BigInt)]
    pub dead: i64,
}

pub async fn summary(conn: &mut AsyncPgConnection) -> QueryResult<Summary> {
    diesel::sql_query(
        "SELECT (SELECT count(*) FROM outbox) AS pending, \
                (SELECT extract(epoch FROM now() - min(created_at))::float8 FROM outbox) \
                    AS oldest_pending_age_seconds, \
                (SELECT count(*) FROM outbox_dead) AS dead",
    )
    .get_result(conn)
    .await
}

#[derive(Clone, Debug, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = outbox_dead, check_for_backend(diesel::pg::Pg))]
pub struct DeadMessage {
    pub id: Uuid,
    pub order_id: Uuid,
    pub event_type: String,
    pub routing_key: String,
    pub correlation_id: String,
    #[serde(serialize_with = "crate::domain::order::rfc3339")]
    pub created_at: DateTime<Utc>,
    pub attempts: i32,
    pub last_error: Option<String>,
    #[serde(serialize_with = "crate::domain::order::rfc3339")]
    pub dead_at: DateTime<Utc>,
}

/// One page of dead-lettered messages, oldest first, after the cursor
/// `(dead_at, id)` of the previous page's last entry.
pub async fn list_dead(
    conn: &mut AsyncPgConnection,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> QueryResult<Vec<DeadMessage>> {
    let mut query = outbox_dead::table
        .select(DeadMessage::as_select())
        .order((outbox_dead::dead_at, outbox_dead::id))
        .limit(limit)
        .into_boxed();
    if let Some((dead_at, id)) = after {
        query = query.filter(
            outbox_dead::dead_at
                .gt(dead_at)
                .or(outbox_dead::dead_at.eq(dead_at).and(outbox_dead::id.gt(id))),
        );
    }
    query.load(conn).await
}

/// Puts a dead-lettered message back in the outbox with its attempts reset, due
/// now. Returns false when there is no such dead message.
pub async fn requeue_dead(conn: &mut AsyncPgConnection, id: Uuid) -> QueryResult<bool> {
    let moved = diesel::sql_query(
        "WITH moved AS (DELETE FROM outbox_dead WHERE id = $1 \
             RETURNING id, order_id, event_type, routing_key, correlation_id, payload, \
                       created_at, last_error) \
         INSERT INTO outbox (id, order_id, event_type, routing_key, correlation_id, payload, \
                             created_at, last_error) \
         SELECT id, order_id, event_type, routing_key, correlation_id, payload, created_at, \
                last_error FROM moved",
    )
    .bind::<SqlUuid, _>(id)
    .execute(conn)
    .await?;
    Ok(moved == 1)
}
