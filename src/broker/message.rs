//! The AMQP shape of an order event (SPEC §3): body, routing key, properties.

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use serde::Deserialize;
use uuid::Uuid;

use crate::domain::Order;
use crate::domain::order::rfc3339;
use crate::storage::outbox::OutboxMessage;

pub const ORDER_CREATED: &str = "order.created";
pub const APP_ID: &str = "order-pipeline";
pub const CONTENT_TYPE: &str = "application/json";
/// AMQP delivery mode 2: the broker writes the message to disk.
pub const PERSISTENT: u8 = 2;

#[derive(serde::Serialize)]
struct OrderCreated<'a> {
    event_id: Uuid,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(serialize_with = "rfc3339")]
    occurred_at: DateTime<Utc>,
    order: &'a Order,
}

/// The body of the `order.created` event for a just-accepted order. Built once,
/// when the order commits, and stored in the outbox: every re-publication sends
/// the same bytes' worth of content.
pub fn order_created_body(event_id: Uuid, order: &Order) -> serde_json::Value {
    serde_json::to_value(OrderCreated {
        event_id,
        kind: ORDER_CREATED,
        occurred_at: order.created_at,
        order,
    })
    .unwrap_or_else(|e| unreachable!("an order always serialises: {e}"))
}

/// The properties of SPEC §3 for an outbox message.
/// Why `message` can never be published as it stands, if so: AMQP carries its
/// routing key, correlation id and type as short strings (at most 255 bytes).
/// Only a row written by another writer can be like that.
pub fn unpublishable(message: &OutboxMessage) -> Option<String> {
    [
        ("routing_key", &message.routing_key),
        ("correlation_id", &message.correlation_id),
        ("event_type", &message.event_type),
    ]
    .into_iter()
    .find(|(_, value)| value.len() > 255)
    .map(|(field, value)| format!("{field} is {} bytes; AMQP allows at most 255", value.len()))
}

/// The AMQP properties of `message`; call only if [`unpublishable`] is `None`.
pub fn properties(message: &OutboxMessage) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(message.id.to_string().into())
        .with_correlation_id(message.correlation_id.as_str().into())
        .with_content_type(CONTENT_TYPE.into())
        .with_delivery_mode(PERSISTENT)
        .with_type(message.event_type.as_str().into())
        .with_timestamp(message.created_at.timestamp().max(0) as u64)
        .with_app_id(APP_ID.into())
}

/// What the order processor reads of a message body; the rest is ignored.
#[derive(Debug, Deserialize)]
pub struct IncomingEvent {
    pub event_id: Uuid,
    pub order: IncomingOrder,
}

#[derive(Debug, Deserialize)]
pub struct IncomingOrder {
    pub id: Uuid,
}
