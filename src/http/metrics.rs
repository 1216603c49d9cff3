//! `GET /metrics`: Prometheus (OpenMetrics) text.

use std::time::Duration;

use actix_web::{HttpResponse, web};

use super::AppState;
use crate::storage::outbox;

/// The backlog gauges come from the database; a scrape does not wait long for it.
const BACKLOG_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let read = async {
        let mut conn = state.pool.get().await.ok()?;
        outbox::summary(&mut conn).await.ok()
    };
    // When the database is unreachable the gauges keep their last values.
    if let Ok(Some(summary)) = tokio::time::timeout(BACKLOG_QUERY_TIMEOUT, read).await {
        let m = &state.metrics;
        m.outbox_pending.set(summary.pending);
        m.outbox_oldest_pending_age
            .set(summary.oldest_pending_age_seconds.unwrap_or(0.0));
        m.outbox_dead.set(summary.dead);
    }
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(state.metrics.encode())
}
