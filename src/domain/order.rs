//! Orders: the request body, its validation (SPEC §2) and the stored order.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};
use uuid::Uuid;

pub const CUSTOMER_ID_MAX_CHARS: usize = 128;
pub const SKU_MAX_CHARS: usize = 64;
pub const MAX_ITEMS: usize = 100;
pub const QUANTITY_RANGE: std::ops::RangeInclusive<i64> = 1..=10_000;
pub const UNIT_PRICE_CENTS_RANGE: std::ops::RangeInclusive<i64> = 0..=100_000_000;

/// `POST /orders` as the client sent it. Unknown fields are refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    pub customer_id: String,
    pub currency: String,
    pub items: Vec<Item>,
}

/// One line of an order; the same shape in requests, responses and messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

/// A validated order that is not stored yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewOrder {
    pub customer_id: String,
    pub currency: String,
    pub items: Vec<Item>,
    pub total_cents: i64,
}

/// Why a request body was refused; `field` is the JSON path of the culprit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

fn fail(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        message: message.into(),
    }
}

fn has_control_chars(s: &str) -> bool {
    s.chars()
        .any(|c| matches!(c, '\u{0}'..='\u{1f}' | '\u{7f}'))
}

fn check_text(field: &str, value: &str, max_chars: usize) -> Result<(), ValidationError> {
    let chars = value.chars().count();
    if chars == 0 || chars > max_chars {
        return Err(fail(
            field,
            format!("must be 1..={max_chars} characters, got {chars}"),
        ));
    }
    if has_control_chars(value) {
        return Err(fail(field, "must not contain control characters"));
    }
    Ok(())
}

impl TryFrom<OrderRequest> for NewOrder {
    type Error = ValidationError;

    fn try_from(req: OrderRequest) -> Result<Self, ValidationError> {
        check_text("customer_id", &req.customer_id, CUSTOMER_ID_MAX_CHARS)?;
        if !(req.currency.len() == 3 && req.currency.bytes().all(|b| b.is_ascii_uppercase())) {
            return Err(fail(
                "currency",
                "must be three upper-case letters, like EUR",
            ));
        }
        if req.items.is_empty() || req.items.len() > MAX_ITEMS {
            return Err(fail(
                "items",
                format!("must have 1..={MAX_ITEMS} entries, got {}", req.items.len()),
            ));
        }
        let mut total_cents: i64 = 0;
        for (i, item) in req.items.iter().enumerate() {
            check_text(&format!("items[{i}].sku"), &item.sku, SKU_MAX_CHARS)?;
            if !QUANTITY_RANGE.contains(&item.quantity) {
                return Err(fail(
                    format!("items[{i}].quantity"),
                    format!("must be an integer in 1..=10000, got {}", item.quantity),
                ));
            }
            if !UNIT_PRICE_CENTS_RANGE.contains(&item.unit_price_cents) {
                return Err(fail(
                    format!("items[{i}].unit_price_cents"),
                    format!(
                        "must be an integer in 0..=100000000, got {}",
                        item.unit_price_cents
                    ),
                ));
            }
            // At most 100 × 10^4 × 10^8 = 10^14: far from overflowing an i64.
            total_cents += item.quantity * item.unit_price_cents;
        }
        Ok(NewOrder {
            customer_id: req.customer_id,
            currency: req.currency,
            items: req.items,
            total_cents,
        })
    }
}

/// Where an order is in the pipeline. Only ever moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    /// Committed with its outbox row; the broker has not confirmed it yet.
    Accepted,
    /// The broker confirmed the message.
    Published,
    /// The order processor handled it.
    Processed,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Published => "published",
            Self::Processed => "processed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "accepted" => Some(Self::Accepted),
            "published" => Some(Self::Published),
            "processed" => Some(Self::Processed),
            _ => None,
        }
    }
}

/// An order as `GET /orders/{id}` returns it and as the message carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Order {
    pub id: Uuid,
    pub status: OrderStatus,
    pub correlation_id: String,
    pub customer_id: String,
    pub currency: String,
    pub total_cents: i64,
    pub items: Vec<Item>,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
}

impl Order {
    /// True when `other` was placed with the same body as this one: what an
    /// Idempotency-Key replay must carry to get this order back instead of a 422.
    pub fn same_request_as(&self, other: &Order) -> bool {
        self.customer_id == other.customer_id
            && self.currency == other.currency
            && self.items == other.items
    }
}

/// RFC 3339 in UTC with microseconds: what Postgres stores, so an order reads
/// back exactly as it was answered.
pub fn rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true))
}

/// Now, truncated to what a `timestamptz` keeps.
pub fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: serde_json::Value) -> Result<NewOrder, ValidationError> {
        let req: OrderRequest = serde_json::from_value(json).expect("shape is fine");
        NewOrder::try_from(req)
    }

    fn item(sku: &str, quantity: i64, unit_price_cents: i64) -> serde_json::Value {
        serde_json::json!({"sku": sku, "quantity": quantity, "unit_price_cents": unit_price_cents})
    }

    #[test]
    fn a_valid_order_gets_its_total() {
        let order = request(serde_json::json!({
            "customer_id": "c-42", "currency": "EUR",
            "items": [item("SKU-1", 2, 1250), item("SKU-2", 1, 0)]
        }))
        .expect("valid");
        assert_eq!(order.total_cents, 2500);
    }

    #[test]
    fn bounds_are_inclusive() {
        let long_id = "x".repeat(128);
        let sku = "é".repeat(64); // characters, not bytes
        let items: Vec<_> = (0..100).map(|_| item(&sku, 10_000, 100_000_000)).collect();
        let order =
            request(serde_json::json!({"customer_id": long_id, "currency": "USD", "items": items}))
                .expect("valid at every upper bound");
        assert_eq!(order.total_cents, 100 * 10_000 * 100_000_000);
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases = [
            (
                serde_json::json!({"customer_id": "", "currency": "EUR", "items": [item("a", 1, 1)]}),
                "customer_id",
            ),
            (
                serde_json::json!({"customer_id": "c\u{7f}", "currency": "EUR", "items": [item("a", 1, 1)]}),
                "customer_id",
            ),
            (
                serde_json::json!({"customer_id": "c", "currency": "eur", "items": [item("a", 1, 1)]}),
                "currency",
            ),
            (
                serde_json::json!({"customer_id": "c", "currency": "ÄBC", "items": [item("a", 1, 1)]}),
                "currency",
            ),
            (
                serde_json::json!({"customer_id": "c", "currency": "EUR", "items": []}),
                "items",
            ),
            (
                serde_json::json!({"customer_id": "c", "currency": "EUR", "items": [item("", 1, 1)]}),
                "items[0].sku",
            ),
            (
                serde_json::json!({"customer_id": "c", "currency": "EUR", "items": [item("a", 1, 1), item("a\n", 1, 1)]}),
                "items[1].sku",
            ),
            (
                serde_json::json!({"customer_id": "c", "currency": "EUR", "items": [item("a", 0, 1)]}),
                "items[0].quantity",
            ),
            (
                serde_json::json!({"customer_id": "c", "currency": "EUR", "items": [item("a", 1, -1)]}),
                "items[0].unit_price_cents",
            ),
        ];
        for (body, field) in cases {
            let err = request(body.clone()).expect_err(&body.to_string());
            assert_eq!(err.field, field, "{body}");
        }
    }

    #[test]
    fn status_only_orders_forward() {
        assert!(OrderStatus::Accepted < OrderStatus::Published);
        assert!(OrderStatus::Published < OrderStatus::Processed);
        for s in [
            OrderStatus::Accepted,
            OrderStatus::Published,
            OrderStatus::Processed,
        ] {
            assert_eq!(OrderStatus::parse(s.as_str()), Some(s));
        }
    }
}
