//! The `inbox` table: message ids the order processor has handled.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::schema::inbox;

/// Records `(message_id, order_id)` pairs and returns the message ids that were
/// new. A message id already present, committed or earlier in `entries`, is
/// skipped by the primary key; that, not a read before the write, is what makes
/// a redelivery a no-op even when two deliveries race.
pub async fn record_new(
    conn: &mut AsyncPgConnection,
    entries: &[(String, Uuid)],
) -> QueryResult<Vec<String>> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<_> = entries
        .iter()
        .map(|(message_id, order_id)| {
            (
                inbox::message_id.eq(message_id.as_str()),
                inbox::order_id.eq(*order_id),
            )
        })
        .collect();
    diesel::insert_into(inbox::table)
        .values(&rows)
        .on_conflict(inbox::message_id)
        .do_nothing()
        .returning(inbox::message_id)
        .get_results(conn)
        .await
}
