//! The `orders` table.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel::sql_types::{Array, Text, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::schema::orders;
use crate::domain::{Item, Order, OrderStatus};

#[derive(Debug, Queryable, Selectable)]
#[diesel(table_name = orders, check_for_backend(diesel::pg::Pg))]
pub struct OrderRow {
    pub id: Uuid,
    pub status: String,
    pub correlation_id: String,
    pub customer_id: String,
    pub currency: String,
    pub total_cents: i64,
    pub items: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

impl TryFrom<OrderRow> for Order {
    type Error = DieselError;

    fn try_from(row: OrderRow) -> Result<Self, DieselError> {
        let status = OrderStatus::parse(&row.status).ok_or_else(|| {
            DieselError::DeserializationError(
                format!("unknown order status {:?}", row.status).into(),
            )
        })?;
        let items: Vec<Item> = serde_json::from_value(row.items)
            .map_err(|e| DieselError::DeserializationError(Box::new(e)))?;
        Ok(Order {
            id: row.id,
            status,
            correlation_id: row.correlation_id,
            customer_id: row.customer_id,
            currency: row.currency,
            total_cents: row.total_cents,
            items,
            created_at: row.created_at,
        })
    }
}

#[derive(Debug, Insertable)]
#[diesel(table_name = orders)]
pub struct NewOrderRow<'a> {
    pub id: Uuid,
    pub status: &'static str,
    pub correlation_id: &'a str,
    pub customer_id: &'a str,
    pub currency: &'a str,
    pub total_cents: i64,
    pub items: serde_json::Value,
    pub idempotency_key: Option<&'a str>,
    pub created_at: DateTime<Utc>,
}

/// Inserts the orders in one statement and returns the ids it inserted. An order
/// whose Idempotency-Key is already taken (committed, or earlier in `rows`) is
/// skipped rather than failing the statement; the caller looks it up by key.
/// Rows should come sorted by key so that concurrent batches lock keys in one
/// order and cannot deadlock.
pub async fn insert_skipping_taken_keys(
    conn: &mut AsyncPgConnection,
    rows: &[NewOrderRow<'_>],
) -> QueryResult<Vec<Uuid>> {
    diesel::insert_into(orders::table)
        .values(rows)
        .on_conflict(orders::idempotency_key)
        .do_nothing()
        .returning(orders::id)
        .get_results(conn)
        .await
}

pub async fn find(conn: &mut AsyncPgConnection, id: Uuid) -> QueryResult<Option<Order>> {
    let row: Option<OrderRow> = orders::table
        .find(id)
        .select(OrderRow::as_select())
        .first(conn)
        .await
        .optional()?;
    row.map(Order::try_from).transpose()
}

/// The orders holding these Idempotency-Keys, with their keys.
pub async fn find_by_idempotency_keys(
    conn: &mut AsyncPgConnection,
    keys: &[&str],
) -> QueryResult<Vec<(String, Order)>> {
    let rows: Vec<(Option<String>, OrderRow)> = orders::table
        .filter(orders::idempotency_key.eq_any(keys))
        .select((orders::idempotency_key, OrderRow::as_select()))
        .load(conn)
        .await?;
    rows.into_iter()
        .map(|(key, row)| Ok((key.unwrap_or_default(), Order::try_from(row)?)))
        .collect()
}

/// Which of these ids exist.
pub async fn existing_ids(conn: &mut AsyncPgConnection, ids: &[Uuid]) -> QueryResult<Vec<Uuid>> {
    orders::table
        .filter(orders::id.eq_any(ids))
        .select(orders::id)
        .load(conn)
        .await
}

/// Moves the orders to `to` where that is a step forward, never back: a late
/// "published" leaves a "processed" order alone. Rows are locked in id order,
/// so that the publisher and the processor, which both advance batches of
/// orders, cannot deadlock on each other. Returns how many rows moved.
pub async fn advance_status(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
    to: OrderStatus,
) -> QueryResult<usize> {
    let from: Vec<&str> = [
        OrderStatus::Accepted,
        OrderStatus::Published,
        OrderStatus::Processed,
    ]
    .into_iter()
    .filter(|s| *s < to)
    .map(OrderStatus::as_str)
    .collect();
    if ids.is_empty() || from.is_empty() {
        return Ok(0);
    }
    diesel::sql_query(
        "UPDATE orders SET status = $1, updated_at = now() \
         WHERE id IN (SELECT id FROM orders WHERE id = ANY($2) AND status = ANY($3) \
                      ORDER BY id FOR UPDATE)",
    )
    .bind::<Text, _>(to.as_str())
    .bind::<Array<SqlUuid>, _>(ids)
    .bind::<Array<Text>, _>(&from)
    .execute(conn)
    .await
}

/// Forgets the Idempotency-Keys of orders created before `before` (the orders
/// stay). Bounded per call so that it never holds many row locks at once.
pub async fn expire_idempotency_keys(
    conn: &mut AsyncPgConnection,
    before: DateTime<Utc>,
    limit: i64,
) -> QueryResult<usize> {
    diesel::sql_query(
        "UPDATE orders SET idempotency_key = NULL \
         WHERE id IN (SELECT id FROM orders WHERE idempotency_key IS NOT NULL AND created_at < $1 \
                      ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind::<diesel::sql_types::Timestamptz, _>(before)
    .bind::<diesel::sql_types::BigInt, _>(limit)
    .execute(conn)
    .await
}
