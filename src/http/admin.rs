//! The admin endpoints (SPEC §2): the outbox backlog and its dead letters.
//!
//! All answer 404 while `ADMIN_TOKEN` is unset, and 401 without
//! `Authorization: Bearer $ADMIN_TOKEN`.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use chrono::{DateTime, Utc};
use diesel::result::Error as DieselError;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::AppState;
use crate::error::{error_response, error_response_builder};
use crate::pipeline::Wake;
use crate::storage::{self, PooledConnection, outbox};

const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 500;
const ADMIN_DEADLINE: Duration = Duration::from_millis(4500);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin endpoints are disabled (ADMIN_TOKEN is not set)")]
    Disabled,
    #[error("a valid admin token is required (Authorization: Bearer <ADMIN_TOKEN>)")]
    Unauthorized,
    #[error("{0:?} is not a message id (a UUID)")]
    InvalidId(String),
    #[error("{0}")]
    InvalidQuery(String),
    #[error("no dead-lettered message with id {0}")]
    NotFound(Uuid),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ResponseError for AdminError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Disabled | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::InvalidId(_) => StatusCode::BAD_REQUEST,
            Self::InvalidQuery(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let code = match self {
            Self::Disabled | Self::NotFound(_) => "not_found",
            Self::Unauthorized => "unauthorized",
            Self::InvalidId(_) => "invalid_id",
            Self::InvalidQuery(_) => "validation_failed",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        };
        if let Self::Internal(_) = self {
            tracing::error!(error = %self, "admin request failed");
        }
        if let Self::Unauthorized = self {
            let mut builder = HttpResponse::Unauthorized();
            builder.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            return error_response_builder(builder, code, &self.to_string());
        }
        error_response(self.status_code(), code, &self.to_string())
    }
}

fn storage_error(e: DieselError) -> AdminError {
    if storage::is_unavailable(&e) {
        AdminError::Unavailable(format!("the database is unavailable: {e}"))
    } else {
        AdminError::Internal(e.to_string())
    }
}

/// Compares without an early exit, so timing does not reveal a prefix.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), AdminError> {
    let expected = state.admin_token.as_deref().ok_or(AdminError::Disabled)?;
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token)
        .ok_or(AdminError::Unauthorized)?;
    if same_secret(given.trim().as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(AdminError::Unauthorized)
    }
}

async fn connection(state: &AppState) -> Result<PooledConnection, AdminError> {
    state
        .pool
        .get()
        .await
        .map_err(|e| AdminError::Unavailable(format!("the database is unavailable: {e}")))
}

async fn within<T>(work: impl Future<Output = Result<T, AdminError>>) -> Result<T, AdminError> {
    tokio::time::timeout(ADMIN_DEADLINE, work)
        .await
        .map_err(|_| AdminError::Unavailable("the database did not answer in time".into()))?
}

/// `GET /outbox`: pending count, oldest pending age, dead count.
pub async fn summary(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, AdminError> {
    authorize(&req, &state)?;
    let summary = within(async {
        let mut conn = connection(&state).await?;
        outbox::summary(&mut conn).await.map_err(storage_error)
    })
    .await?;
    Ok(HttpResponse::Ok().json(summary))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    limit: Option<i64>,
    /// The `next` of the previous page.
    after: Option<String>,
}

/// The latest instant a cursor may name (9999-12-31T23:59:59.999999Z): every
/// cursor this API hands out is a recent `dead_at`, and chrono's range is wider
/// than Postgres's.
const CURSOR_MAX_MICROS: i64 = 253_402_300_799_999_999;

fn parse_cursor(cursor: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let (micros, id) = cursor.split_once('_')?;
    let micros: i64 = micros
        .parse()
        .ok()
        .filter(|m| (0..=CURSOR_MAX_MICROS).contains(m))?;
    Some((
        DateTime::from_timestamp_micros(micros)?,
        Uuid::try_parse(id).ok()?,
    ))
}

/// `GET /outbox/dead?limit=&after=`: dead-lettered messages, oldest first.
pub async fn list_dead(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: Result<web::Query<PageQuery>, actix_web::Error>,
) -> Result<HttpResponse, AdminError> {
    authorize(&req, &state)?;
    let query = query.map_err(|e| AdminError::InvalidQuery(format!("query: {e}")))?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(AdminError::InvalidQuery(format!(
            "limit: must be 1..={MAX_PAGE}"
        )));
    }
    let after =
        match &query.after {
            None => None,
            Some(c) => Some(parse_cursor(c).ok_or_else(|| {
                AdminError::InvalidQuery("after: not a cursor from this API".into())
            })?),
        };
    let items = within(async {
        let mut conn = connection(&state).await?;
        outbox::list_dead(&mut conn, after, limit)
            .await
            .map_err(storage_error)
    })
    .await?;
    let next = (items.len() as i64 == limit)
        .then(|| {
            items
                .last()
                .map(|m| format!("{}_{}", m.dead_at.timestamp_micros(), m.id))
        })
        .flatten();
    Ok(HttpResponse::Ok().json(json!({"items": items, "next": next})))
}

/// `POST /outbox/dead/{id}/requeue`: back into the outbox, attempts reset.
pub async fn requeue(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, AdminError> {
    authorize(&req, &state)?;
    let raw = path.into_inner();
    let id = Uuid::try_parse(&raw).map_err(|_| AdminError::InvalidId(raw.clone()))?;
    let moved = within(async {
        let mut conn = connection(&state).await?;
        outbox::requeue_dead(&mut conn, id)
            .await
            .map_err(storage_error)
    })
    .await?;
    if !moved {
        return Err(AdminError::NotFound(id));
    }
    tracing::info!(outbox.id = %id, "dead-lettered message requeued by an admin");
    state.watcher.do_send(Wake);
    Ok(HttpResponse::Ok().json(json!({"requeued": id})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
    }

    #[test]
    fn cursors_round_trip() {
        let id = Uuid::new_v4();
        let at = DateTime::from_timestamp_micros(1_700_000_000_123_456).expect("valid");
        assert_eq!(
            parse_cursor(&format!("{}_{id}", at.timestamp_micros())),
            Some((at, id))
        );
        assert_eq!(parse_cursor("garbage"), None);
        let nil = Uuid::nil();
        assert_eq!(
            parse_cursor(&format!("-211000000000000000_{nil}")),
            None,
            "before what Postgres holds"
        );
        assert_eq!(
            parse_cursor(&format!("{}_{nil}", CURSOR_MAX_MICROS + 1)),
            None
        );
    }
}
