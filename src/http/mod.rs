//! The HTTP API of SPEC §2: thin handlers that validate, hand work to a
//! pipeline stage or a storage function, and map the outcome to JSON.

pub mod admin;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod orders;

use std::sync::Arc;

use actix::Addr;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{HttpMessage as _, HttpResponse, guard, web};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::error::{error_response, error_response_builder};
use crate::metrics::{HttpLabels, Metrics};
use crate::pipeline::persist::PersistActor;
use crate::pipeline::watcher::OutboxWatcher;
use crate::status::StatusBoard;
use crate::storage::PgPool;

pub const CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");
pub const CORRELATION_ID_MAX: usize = 128;

/// What the handlers share.
pub struct AppState {
    pub persist: Addr<PersistActor>,
    pub watcher: Addr<OutboxWatcher>,
    pub pool: PgPool,
    pub status: Arc<StatusBoard>,
    pub metrics: Arc<Metrics>,
    pub admin_token: Option<String>,
}

/// GET, and HEAD wherever GET is (RFC 9110; actix drops the body of a HEAD answer).
fn get() -> actix_web::Route {
    web::route().guard(guard::Any(guard::Get()).or(guard::Head()))
}

/// Every route of SPEC §2. Each resource answers any other method with a
/// JSON 405 naming the ones it allows.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/orders")
            .route(web::post().to(orders::create))
            .default_service(web::to(|| method_not_allowed("POST"))),
    )
    .service(
        web::resource("/orders/{id}")
            .route(get().to(orders::get))
            .default_service(web::to(|| method_not_allowed("GET, HEAD"))),
    )
    .service(
        web::resource("/health/live")
            .route(get().to(health::live))
            .default_service(web::to(|| method_not_allowed("GET, HEAD"))),
    )
    .service(
        web::resource("/health/ready")
            .route(get().to(health::ready))
            .default_service(web::to(|| method_not_allowed("GET, HEAD"))),
    )
    .service(
        web::resource("/metrics")
            .route(get().to(metrics::metrics))
            .default_service(web::to(|| method_not_allowed("GET, HEAD"))),
    )
    .service(
        web::resource("/openapi.json")
            .route(get().to(openapi::document))
            .default_service(web::to(|| method_not_allowed("GET, HEAD"))),
    )
    .service(
        web::resource("/outbox")
            .route(get().to(admin::summary))
            .default_service(web::to(|| method_not_allowed("GET, HEAD"))),
    )
    .service(
        web::resource("/outbox/dead")
            .route(get().to(admin::list_dead))
            .default_service(web::to(|| method_not_allowed("GET, HEAD"))),
    )
    .service(
        web::resource("/outbox/dead/{id}/requeue")
            .route(web::post().to(admin::requeue))
            .default_service(web::to(|| method_not_allowed("POST"))),
    );
}

/// Any path no route matches.
pub async fn not_found() -> HttpResponse {
    error_response(StatusCode::NOT_FOUND, "not_found", "no such resource")
}

async fn method_not_allowed(allow: &'static str) -> HttpResponse {
    let mut builder = HttpResponse::MethodNotAllowed();
    builder.insert_header((header::ALLOW, allow));
    error_response_builder(
        builder,
        "method_not_allowed",
        &format!("this resource only answers {allow}"),
    )
}

/// The request's correlation id: the client's `X-Correlation-ID` when it is
/// valid (1..=128 visible ASCII characters), else a new UUID.
#[derive(Clone, Debug)]
pub struct CorrelationId(pub String);

pub fn is_visible_ascii(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Methods are a client's free text: anything but the standard ones counts
/// as "other", so that made-up methods cannot grow the metrics without bound.
fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Per request: a span with the route and correlation id, the correlation id
/// echoed on every response, and the request counted by route and status.
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let given = req
        .headers()
        .get(&CORRELATION_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_visible_ascii(v, CORRELATION_ID_MAX))
        .map(str::to_owned);
    let correlation_id = given.unwrap_or_else(|| Uuid::new_v4().to_string());
    req.extensions_mut()
        .insert(CorrelationId(correlation_id.clone()));
    let metrics = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.metrics.clone());
    let method = method_label(req.method());
    let span = tracing::info_span!(
        "http",
        http.method = %req.method(),
        http.path = %req.path(),
        correlation_id = %correlation_id,
    );

    let mut res = next.call(req).instrument(span).await?;

    if let Ok(value) = HeaderValue::from_str(&correlation_id) {
        res.headers_mut().insert(CORRELATION_ID, value);
    }
    if let Some(metrics) = metrics {
        let route = res
            .request()
            .match_pattern()
            .unwrap_or_else(|| "(unmatched)".to_owned());
        metrics
            .http_requests
            .get_or_create(&HttpLabels {
                route,
                method: method.to_owned(),
                status: res.status().as_u16(),
            })
            .inc();
    }
    Ok(res)
}
