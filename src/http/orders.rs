//! `POST /orders` and `GET /orders/{id}`.
//!
//! The POST handler checks everything a client can get wrong before anything
//! is stored (media type, size, JSON, every field rule, the two headers), then
//! hands the order to the PersistActor and answers 201 only after its commit.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderMap};
use actix_web::{HttpMessage as _, HttpRequest, HttpResponse, ResponseError, web};
use diesel::result::Error as DieselError;
use futures_util::StreamExt as _;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::{AppState, CORRELATION_ID, CORRELATION_ID_MAX, CorrelationId, is_visible_ascii};
use crate::domain::{NewOrder, Order, OrderRequest, ValidationError};
use crate::error::error_response;
use crate::pipeline::persist::{PersistError, PersistOrder, Persisted};
use crate::storage::{self, orders};

/// SPEC §2: bodies larger than this are refused with 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const IDEMPOTENCY_KEY_MAX: usize = 255;
/// SPEC §2: an unreachable database is answered with 503 within 5 s.
pub const REQUEST_DEADLINE: Duration = Duration::from_millis(4500);
/// A body that trickles in slower than this is refused: a client must not hold
/// a connection and a worker's attention by sending a byte a second.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum OrdersError {
    #[error("{0}")]
    UnsupportedMediaType(&'static str),
    #[error("the request body did not arrive within {BODY_READ_TIMEOUT:?}")]
    BodyTimeout,
    #[error("the request body is larger than {MAX_BODY_BYTES} bytes")]
    PayloadTooLarge,
    #[error("the request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("{0}")]
    Validation(#[from] ValidationError),
    #[error("this Idempotency-Key was already used with a different request body")]
    IdempotencyKeyReused,
    #[error("{0:?} is not an order id (a UUID)")]
    InvalidId(String),
    #[error("no order with id {0}")]
    NotFound(Uuid),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ResponseError for OrdersError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::MalformedJson(_) | Self::InvalidId(_) => StatusCode::BAD_REQUEST,
            Self::Validation(_) | Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let code = match self {
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::BodyTimeout => "request_timeout",
            Self::PayloadTooLarge => "payload_too_large",
            Self::MalformedJson(_) => "malformed_json",
            Self::Validation(_) => "validation_failed",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::InvalidId(_) => "invalid_id",
            Self::NotFound(_) => "not_found",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        };
        match self {
            Self::Unavailable(_) => tracing::warn!(error = %self, "answering 503"),
            Self::Internal(_) => tracing::error!(error = %self, "answering 500"),
            _ => tracing::debug!(error = %self, "refused a request"),
        }
        error_response(self.status_code(), code, &self.to_string())
    }
}

impl From<PersistError> for OrdersError {
    fn from(e: PersistError) -> Self {
        match e {
            PersistError::KeyReused => Self::IdempotencyKeyReused,
            PersistError::Unavailable(_) => Self::Unavailable(e.to_string()),
            PersistError::Failed(_) => Self::Internal(e.to_string()),
        }
    }
}

fn storage_error(e: DieselError) -> OrdersError {
    if storage::is_unavailable(&e) {
        OrdersError::Unavailable(format!("the database is unavailable: {e}"))
    } else {
        OrdersError::Internal(format!("reading the order failed: {e}"))
    }
}

/// `POST /orders`.
pub async fn create(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, OrdersError> {
    require_json(req.headers())?;
    let idempotency_key = idempotency_key(req.headers())?;
    let correlation_id = correlation_id(&req)?;
    let body = read_body(req.headers(), payload).await?;
    let order = parse_order(&body)?;

    let (reply, answer) = oneshot::channel();
    // The persist stage finishes the order's transaction before this, so the
    // timeout below is a backstop and the client hears the real outcome.
    let answer_by = tokio::time::Instant::now() + REQUEST_DEADLINE;
    state
        .persist
        .try_send(PersistOrder {
            order,
            idempotency_key,
            correlation_id,
            answer_by,
            reply,
        })
        .map_err(|_| OrdersError::Unavailable("the service is overloaded; retry later".into()))?;
    let outcome = tokio::time::timeout_at(answer_by, answer)
        .await
        .map_err(|_| {
            OrdersError::Unavailable(format!(
                "the order was not stored within {REQUEST_DEADLINE:?}; retry (with an Idempotency-Key to be safe)"
            ))
        })?
        .map_err(|_| OrdersError::Unavailable("the persist stage stopped; retry".into()))??;

    Ok(match outcome {
        Persisted::Created(order) => order_response(StatusCode::CREATED, &order),
        Persisted::Existing(order) => order_response(StatusCode::OK, &order),
    })
}

/// `GET /orders/{id}`.
pub async fn get(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, OrdersError> {
    let raw = path.into_inner();
    let id = Uuid::try_parse(&raw).map_err(|_| OrdersError::InvalidId(raw.clone()))?;
    let read = async {
        let mut conn =
            state.pool.get().await.map_err(|e| {
                OrdersError::Unavailable(format!("the database is unavailable: {e}"))
            })?;
        orders::find(&mut conn, id).await.map_err(storage_error)
    };
    let order = tokio::time::timeout(REQUEST_DEADLINE, read)
        .await
        .map_err(|_| OrdersError::Unavailable("the database did not answer in time".into()))??
        .ok_or(OrdersError::NotFound(id))?;
    Ok(order_response(StatusCode::OK, &order))
}

fn order_response(status: StatusCode, order: &Order) -> HttpResponse {
    let mut builder = HttpResponse::build(status);
    if status == StatusCode::CREATED {
        builder.insert_header((header::LOCATION, format!("/orders/{}", order.id)));
    }
    builder.json(order)
}

/// `application/json`, in UTF-8 (the only encoding of JSON we read), not
/// compressed.
fn require_json(headers: &HeaderMap) -> Result<(), OrdersError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mut parts = content_type.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|essence| essence.eq_ignore_ascii_case("application/json"))
    {
        return Err(OrdersError::UnsupportedMediaType(
            "Content-Type must be application/json",
        ));
    }
    for param in parts {
        if let Some((name, value)) = param.split_once('=') {
            let value = value.trim().trim_matches('"');
            if name.trim().eq_ignore_ascii_case("charset") && !value.eq_ignore_ascii_case("utf-8") {
                return Err(OrdersError::UnsupportedMediaType(
                    "the body must be UTF-8 (charset=utf-8)",
                ));
            }
        }
    }
    let encoded = headers.get_all(header::CONTENT_ENCODING).any(|v| {
        !v.to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("identity"))
    });
    if encoded {
        return Err(OrdersError::UnsupportedMediaType(
            "Content-Encoding is not supported; send the body as is",
        ));
    }
    Ok(())
}

/// The value of a header that may be given at most once.
fn single_header<'a>(
    headers: &'a HeaderMap,
    name: &str,
    shown: &str,
) -> Result<Option<&'a header::HeaderValue>, OrdersError> {
    let mut values = headers.get_all(name);
    let first = values.next();
    if values.next().is_some() {
        return Err(ValidationError {
            field: shown.into(),
            message: "must be given at most once".into(),
        }
        .into());
    }
    Ok(first)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, OrdersError> {
    let Some(value) = single_header(headers, IDEMPOTENCY_KEY, "Idempotency-Key")? else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if is_visible_ascii(key, IDEMPOTENCY_KEY_MAX) => Ok(Some(key.to_owned())),
        _ => Err(ValidationError {
            field: "Idempotency-Key".into(),
            message: format!("must be 1..={IDEMPOTENCY_KEY_MAX} visible ASCII characters"),
        }
        .into()),
    }
}

/// The middleware resolved the id; a client-given one must also be valid.
fn correlation_id(req: &HttpRequest) -> Result<String, OrdersError> {
    if let Some(value) = single_header(req.headers(), CORRELATION_ID.as_str(), "X-Correlation-ID")?
    {
        match value.to_str() {
            Ok(id) if is_visible_ascii(id, CORRELATION_ID_MAX) => {}
            _ => {
                return Err(ValidationError {
                    field: "X-Correlation-ID".into(),
                    message: format!("must be 1..={CORRELATION_ID_MAX} visible ASCII characters"),
                }
                .into());
            }
        }
    }
    Ok(req
        .extensions()
        .get::<CorrelationId>()
        .map(|c| c.0.clone())
        .unwrap_or_else(|| Uuid::new_v4().to_string()))
}

/// Reads at most [`MAX_BODY_BYTES`]; a declared or actual excess is a 413.
async fn read_body(
    headers: &HeaderMap,
    mut payload: web::Payload,
) -> Result<web::BytesMut, OrdersError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        return Err(OrdersError::PayloadTooLarge);
    }
    let read = async {
        let mut body = web::BytesMut::with_capacity(declared.unwrap_or(1024).min(MAX_BODY_BYTES));
        while let Some(chunk) = payload.next().await {
            // A body cut short (the connection closed before its length or its
            // last chunk) is an error here, never a complete order.
            let chunk = chunk.map_err(|e| match e {
                actix_web::error::PayloadError::Overflow => OrdersError::PayloadTooLarge,
                other => OrdersError::MalformedJson(format!("the body could not be read: {other}")),
            })?;
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(OrdersError::PayloadTooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        if declared.is_some_and(|n| n != body.len()) {
            return Err(OrdersError::MalformedJson(
                "the body ended before its Content-Length".into(),
            ));
        }
        Ok(body)
    };
    tokio::time::timeout(BODY_READ_TIMEOUT, read)
        .await
        .map_err(|_| OrdersError::BodyTimeout)?
}

/// JSON syntax errors are 400 `malformed_json`, whatever the body's shape;
/// well-formed JSON of the wrong shape (an array for an object, a missing,
/// unknown or mistyped field) and broken rules are 422, naming the field by
/// its path.
pub fn parse_order(body: &[u8]) -> Result<NewOrder, OrdersError> {
    let value: serde_json::Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        // Well-formed, but beyond any field's range: named by the typed parse.
        Err(e) if e.to_string().starts_with("number out of range") => {
            let mut de = serde_json::Deserializer::from_slice(body);
            return Err(shape_error(
                serde_path_to_error::deserialize::<_, OrderRequest>(&mut de)
                    .err()
                    .map(|e| (e.path().to_string(), e.into_inner().to_string()))
                    .unwrap_or_else(|| ("body".into(), e.to_string())),
            ));
        }
        Err(e) => return Err(OrdersError::MalformedJson(e.to_string())),
    };
    // serde reads a struct from an array as readily as from an object; SPEC §2
    // defines named fields only.
    require_object(&value, "body")?;
    if let Some(items) = value.get("items").and_then(serde_json::Value::as_array) {
        for (i, item) in items.iter().enumerate() {
            require_object(item, &format!("items[{i}]"))?;
        }
    }
    // Typed from the bytes, not from `value`: a map keeps only the last of
    // duplicated keys, the typed parse refuses them ("duplicate field").
    let mut de = serde_json::Deserializer::from_slice(body);
    let request: OrderRequest = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| shape_error((e.path().to_string(), e.into_inner().to_string())))?;
    Ok(NewOrder::try_from(request)?)
}

fn require_object(value: &serde_json::Value, field: &str) -> Result<(), OrdersError> {
    if value.is_object() {
        return Ok(());
    }
    Err(ValidationError {
        field: field.into(),
        message: "must be a JSON object with named fields".into(),
    }
    .into())
}

fn shape_error((path, message): (String, String)) -> OrdersError {
    OrdersError::Validation(ValidationError {
        field: if path == "." { "body".into() } else { path },
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(body: &str) -> &'static str {
        match parse_order(body.as_bytes()) {
            Ok(_) => "ok",
            Err(OrdersError::MalformedJson(_)) => "malformed_json",
            Err(OrdersError::Validation(_)) => "validation_failed",
            Err(_) => "other",
        }
    }

    #[test]
    fn syntax_is_400_and_shape_is_422() {
        let ok = r#"{"customer_id":"c","currency":"EUR","items":[{"sku":"a","quantity":1,"unit_price_cents":1}]}"#;
        assert_eq!(code(ok), "ok");
        assert_eq!(code(""), "malformed_json");
        assert_eq!(code("{"), "malformed_json");
        assert_eq!(code(&format!("{ok} trailing")), "malformed_json");
        assert_eq!(code("[]"), "validation_failed");
        assert_eq!(
            code(r#"["c","EUR",[["a",1,1]]]"#),
            "validation_failed",
            "an array for the object"
        );
        assert_eq!(
            code(r#"{"customer_id":"c","currency":"EUR","items":[["a",1,1]]}"#),
            "validation_failed",
            "an array for an item"
        );
        assert_eq!(
            code(r#"{"zz": [[[["#),
            "malformed_json",
            "broken JSON, whatever its first field"
        );
        assert_eq!(code(&"[".repeat(60_000)), "malformed_json");
        assert_eq!(code(r#"["c","EUR",[],"extra"]"#), "validation_failed");
        assert_eq!(
            code(r#"{"customer_id":"c","currency":"EUR"}"#),
            "validation_failed"
        );
        assert_eq!(
            code(
                r#"{"customer_id":"c","currency":"EUR","items":[{"sku":"a","quantity":1.5,"unit_price_cents":1}]}"#
            ),
            "validation_failed"
        );
    }

    #[test]
    fn a_number_beyond_every_range_is_named_by_its_path() {
        for number in ["1e400", &"9".repeat(5000)] {
            let body = format!(
                r#"{{"customer_id":"c","currency":"EUR","items":[{{"sku":"a","quantity":{number},"unit_price_cents":1}}]}}"#
            );
            match parse_order(body.as_bytes()) {
                Err(OrdersError::Validation(v)) => assert_eq!(v.field, "items[0].quantity"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_mistyped_field_is_named_by_its_path() {
        let body = r#"{"customer_id":"c","currency":"EUR","items":[{"sku":"a","quantity":"2","unit_price_cents":1}]}"#;
        match parse_order(body.as_bytes()) {
            Err(OrdersError::Validation(v)) => assert_eq!(v.field, "items[0].quantity"),
            other => panic!("{other:?}"),
        }
    }
}
