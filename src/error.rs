//! The error policy.
//!
//! - HTTP: each route module has its own `thiserror` enum (`OrdersError`,
//!   `AdminError`, ...) that implements `actix_web::ResponseError` through
//!   [`error_response`], so every error leaves as SPEC §2's JSON:
//!   `{"error": {"code": "<snake_case>", "message": "<human text>"}}`.
//!   Client mistakes are 4xx and never logged above `debug`; a 5xx is logged
//!   once, at the point where it is turned into a response.
//! - Input never causes a 500: bodies, headers and path parameters are
//!   validated before anything is stored. A 500 means the service or its
//!   database refused a valid order; nothing was stored (one transaction).
//! - A database that cannot be reached or does not answer in time is 503
//!   `unavailable`, within 5 s (the HTTP path's own deadline).
//! - Storage functions return diesel's `QueryResult`; the stages (actors) use
//!   `anyhow` with `.context(..)` and turn a failure into stop-and-restart,
//!   never into a panic or a stage that silently stops working.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, HttpResponseBuilder};
use serde::Serialize;

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

/// The JSON error response of SPEC §2.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    error_response_builder(HttpResponseBuilder::new(status), code, message)
}

/// The same, on a builder that already carries headers (e.g. `Allow`).
pub fn error_response_builder(
    mut builder: HttpResponseBuilder,
    code: &str,
    message: &str,
) -> HttpResponse {
    builder.json(ErrorBody {
        error: ErrorDetail { code, message },
    })
}
