//! `GET /openapi.json`: the OpenAPI 3 document of every route (SPEC §2).

use std::sync::OnceLock;

use actix_web::HttpResponse;
use serde_json::{Value, json};

pub async fn document() -> HttpResponse {
    static DOC: OnceLock<Value> = OnceLock::new();
    HttpResponse::Ok().json(DOC.get_or_init(build))
}

fn error_ref(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn order_ref(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Order"}}}})
}

fn build() -> Value {
    let bearer = json!([{"adminToken": []}]);
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "order-pipeline",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Takes orders over REST and gets every one of them to RabbitMQ through a transactional outbox."
        },
        "paths": {
            "/orders": {
                "post": {
                    "summary": "Place an order",
                    "description": "Answers 201 only after the order and its outbox row committed in one transaction.",
                    "parameters": [
                        {"name": "Idempotency-Key", "in": "header", "required": false,
                         "description": "1..=255 visible ASCII characters; a retry with the same key and body returns the original order with 200. Kept at least 24 h.",
                         "schema": {"type": "string", "minLength": 1, "maxLength": 255}},
                        {"name": "X-Correlation-ID", "in": "header", "required": false,
                         "description": "1..=128 visible ASCII characters; generated when absent, echoed in the response.",
                         "schema": {"type": "string", "minLength": 1, "maxLength": 128}}
                    ],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewOrder"}}}},
                    "responses": {
                        "201": order_ref("Created"),
                        "200": order_ref("An Idempotency-Key replay: the original order"),
                        "400": error_ref("malformed_json"),
                        "413": error_ref("payload_too_large (over 64 KiB)"),
                        "415": error_ref("unsupported_media_type"),
                        "422": error_ref("validation_failed or idempotency_key_reused"),
                        "503": error_ref("unavailable: the database cannot be reached")
                    }
                }
            },
            "/orders/{id}": {
                "get": {
                    "summary": "Read an order",
                    "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}}],
                    "responses": {
                        "200": order_ref("The order"),
                        "400": error_ref("invalid_id"),
                        "404": error_ref("not_found"),
                        "503": error_ref("unavailable")
                    }
                }
            },
            "/health/live": {"get": {"summary": "Liveness", "responses": {"200": {"description": "The process runs"}}}},
            "/health/ready": {"get": {
                "summary": "Readiness",
                "responses": {
                    "200": {"description": "Database and broker reachable, every stage working", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}},
                    "503": {"description": "Something is down; the body says what", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}}
                }
            }},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "OpenMetrics text", "content": {"application/openmetrics-text": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3"}}}},
            "/outbox": {"get": {
                "summary": "Outbox backlog (admin)", "security": bearer,
                "responses": {
                    "200": {"description": "Backlog", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OutboxSummary"}}}},
                    "401": error_ref("unauthorized"), "404": error_ref("admin endpoints disabled")
                }
            }},
            "/outbox/dead": {"get": {
                "summary": "Dead-lettered messages, oldest first (admin)", "security": bearer,
                "parameters": [
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}},
                    {"name": "after", "in": "query", "description": "The `next` cursor of the previous page", "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {"description": "A page", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/DeadPage"}}}},
                    "401": error_ref("unauthorized"), "404": error_ref("admin endpoints disabled"), "422": error_ref("validation_failed")
                }
            }},
            "/outbox/dead/{id}/requeue": {"post": {
                "summary": "Put a dead-lettered message back in the outbox (admin)", "security": bearer,
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}}],
                "responses": {
                    "200": {"description": "Requeued"},
                    "400": error_ref("invalid_id"), "401": error_ref("unauthorized"),
                    "404": error_ref("not_found (or admin endpoints disabled)")
                }
            }}
        },
        "components": {
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Item": {"type": "object", "additionalProperties": false, "required": ["sku", "quantity", "unit_price_cents"], "properties": {
                    "sku": {"type": "string", "minLength": 1, "maxLength": 64},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 10000},
                    "unit_price_cents": {"type": "integer", "minimum": 0, "maximum": 100000000}
                }},
                "NewOrder": {"type": "object", "additionalProperties": false, "required": ["customer_id", "currency", "items"], "properties": {
                    "customer_id": {"type": "string", "minLength": 1, "maxLength": 128},
                    "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
                    "items": {"type": "array", "minItems": 1, "maxItems": 100, "items": {"$ref": "#/components/schemas/Item"}}
                }},
                "Order": {"type": "object", "required": ["id", "status", "correlation_id", "customer_id", "currency", "total_cents", "items", "created_at"], "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "status": {"type": "string", "enum": ["accepted", "published", "processed"]},
                    "correlation_id": {"type": "string"},
                    "customer_id": {"type": "string"},
                    "currency": {"type": "string"},
                    "total_cents": {"type": "integer"},
                    "items": {"type": "array", "items": {"$ref": "#/components/schemas/Item"}},
                    "created_at": {"type": "string", "format": "date-time"}
                }},
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
                    "code": {"type": "string"}, "message": {"type": "string"}
                }}}},
                "Readiness": {"type": "object", "required": ["database", "broker"], "properties": {
                    "database": {"type": "string", "enum": ["up", "down", "migrating"]},
                    "broker": {"type": "string", "enum": ["up", "down", "blocked", "misconfigured"]},
                    "publisher": {"type": "string"}, "watcher": {"type": "string"}, "processor": {"type": "string"}
                }},
                "OutboxSummary": {"type": "object", "required": ["pending", "dead"], "properties": {
                    "pending": {"type": "integer"},
                    "oldest_pending_age_seconds": {"type": "number", "nullable": true},
                    "dead": {"type": "integer"}
                }},
                "DeadPage": {"type": "object", "required": ["items"], "properties": {
                    "items": {"type": "array", "items": {"type": "object", "properties": {
                        "id": {"type": "string", "format": "uuid"}, "order_id": {"type": "string", "format": "uuid"},
                        "event_type": {"type": "string"}, "routing_key": {"type": "string"}, "correlation_id": {"type": "string"},
                        "created_at": {"type": "string", "format": "date-time"}, "attempts": {"type": "integer"},
                        "last_error": {"type": "string", "nullable": true}, "dead_at": {"type": "string", "format": "date-time"}
                    }}},
                    "next": {"type": "string", "nullable": true}
                }}
            }
        }
    })
}
