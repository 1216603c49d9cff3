//! `GET /health/live` and `GET /health/ready`.

use std::time::Duration;

use actix_web::{HttpResponse, web};
use diesel_async::RunQueryDsl as _;
use serde_json::json;

use super::AppState;
use crate::status::{BrokerState, StageState};

/// A readiness probe answers quickly even when the database hangs.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// 200 while the process runs and serves HTTP.
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "live"}))
}

/// 200 when the database and the broker are reachable and every stage works;
/// otherwise 503, the same shape saying what is not.
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let database = if database_reachable(&state).await {
        if state.status.migrated() {
            "up"
        } else {
            "migrating"
        }
    } else {
        "down"
    };
    let broker = state.status.broker();
    let stages: Vec<(&str, StageState)> = state
        .status
        .stages()
        .into_iter()
        .map(|(name, stage)| (name, stage.get()))
        .collect();
    let ready = database == "up"
        && matches!(broker, BrokerState::Up | BrokerState::Blocked)
        && stages.iter().all(|(_, s)| s.is_healthy());

    let mut body = json!({"database": database, "broker": broker});
    for (name, s) in stages {
        body[name] = json!(s);
    }
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn database_reachable(state: &AppState) -> bool {
    let ping = async {
        let mut conn = state.pool.get().await.ok()?;
        diesel::sql_query("SELECT 1").execute(&mut conn).await.ok()
    };
    matches!(tokio::time::timeout(PING_TIMEOUT, ping).await, Ok(Some(_)))
}
