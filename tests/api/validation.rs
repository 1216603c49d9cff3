//! Every rule of SPEC §2 for `POST /orders`: a bad request gets a 4xx JSON
//! error that names what is wrong, and nothing is stored.

use serde_json::{Value, json};

use crate::helpers::*;

fn with_item(item: Value) -> Value {
    json!({"customer_id": "c-42", "currency": "EUR", "items": [item]})
}

fn item(sku: Value, quantity: Value, unit_price_cents: Value) -> Value {
    json!({"sku": sku, "quantity": quantity, "unit_price_cents": unit_price_cents})
}

#[tokio::test]
async fn every_bad_body_is_refused_with_a_json_error_and_nothing_is_stored() {
    let (db, names) = (TestDb::create().await, Names::new());
    let app = TestApp::ready(base_env(&db.url(), &names)).await;
    let ok_item = item(json!("SKU-1"), json!(1), json!(100));
    let items_101: Vec<Value> = (0..101).map(|_| ok_item.clone()).collect();

    // (what, body, status, code, a word the message must contain)
    let cases: Vec<(&str, String, u16, &str, &str)> = vec![
        ("empty body", "".into(), 400, "malformed_json", "JSON"),
        ("not JSON", "hello".into(), 400, "malformed_json", "JSON"),
        ("truncated", r#"{"customer_id": "c"#.into(), 400, "malformed_json", "JSON"),
        ("trailing garbage", format!("{} x", good_order()), 400, "malformed_json", "JSON"),
        ("an array", "[]".into(), 422, "validation_failed", "body"),
        ("the order as an array", r#"["c-42","EUR",[{"sku":"a","quantity":1,"unit_price_cents":1}]]"#.into(), 422, "validation_failed", "body"),
        ("an item as an array", r#"{"customer_id":"c","currency":"EUR","items":[["a",1,1]]}"#.into(), 422, "validation_failed", "items[0]"),
        ("broken JSON after an unknown field", r#"{"zz": [[[["#.into(), 400, "malformed_json", "JSON"),
        ("60 000 unclosed brackets", "[".repeat(60_000), 400, "malformed_json", "JSON"),
        ("null", "null".into(), 422, "validation_failed", "body"),
        ("missing customer_id", json!({"currency": "EUR", "items": [ok_item]}).to_string(), 422, "validation_failed", "customer_id"),
        ("missing items", json!({"customer_id": "c", "currency": "EUR"}).to_string(), 422, "validation_failed", "items"),
        ("unknown field", json!({"customer_id": "c", "currency": "EUR", "items": [ok_item], "coupon": "X"}).to_string(), 422, "validation_failed", "coupon"),
        ("a duplicated field", r#"{"customer_id":"a","customer_id":"b","currency":"EUR","items":[{"sku":"a","quantity":1,"unit_price_cents":1}]}"#.into(), 422, "validation_failed", "customer_id"),
        ("a duplicated item field", r#"{"customer_id":"a","currency":"EUR","items":[{"sku":"a","quantity":1,"quantity":2,"unit_price_cents":1}]}"#.into(), 422, "validation_failed", "quantity"),
        ("unknown item field", with_item(json!({"sku": "a", "quantity": 1, "unit_price_cents": 1, "colour": "red"})).to_string(), 422, "validation_failed", "colour"),
        ("empty customer_id", json!({"customer_id": "", "currency": "EUR", "items": [ok_item]}).to_string(), 422, "validation_failed", "customer_id"),
        ("customer_id of 129 chars", json!({"customer_id": "x".repeat(129), "currency": "EUR", "items": [ok_item]}).to_string(), 422, "validation_failed", "customer_id"),
        ("customer_id with NUL", json!({"customer_id": "c\u{0}", "currency": "EUR", "items": [ok_item]}).to_string(), 422, "validation_failed", "customer_id"),
        ("customer_id with DEL", json!({"customer_id": "c\u{7f}", "currency": "EUR", "items": [ok_item]}).to_string(), 422, "validation_failed", "customer_id"),
        ("customer_id a number", json!({"customer_id": 42, "currency": "EUR", "items": [ok_item]}).to_string(), 422, "validation_failed", "customer_id"),
        ("lower-case currency", json!({"customer_id": "c", "currency": "eur", "items": [ok_item]}).to_string(), 422, "validation_failed", "currency"),
        ("four-letter currency", json!({"customer_id": "c", "currency": "EURO", "items": [ok_item]}).to_string(), 422, "validation_failed", "currency"),
        ("non-ASCII currency", json!({"customer_id": "c", "currency": "ÉUR", "items": [ok_item]}).to_string(), 422, "validation_failed", "currency"),
        ("no items", json!({"customer_id": "c", "currency": "EUR", "items": []}).to_string(), 422, "validation_failed", "items"),
        ("101 items", json!({"customer_id": "c", "currency": "EUR", "items": items_101}).to_string(), 422, "validation_failed", "items"),
        ("items not a list", json!({"customer_id": "c", "currency": "EUR", "items": {}}).to_string(), 422, "validation_failed", "items"),
        ("empty sku", with_item(item(json!(""), json!(1), json!(1))).to_string(), 422, "validation_failed", "items[0].sku"),
        ("sku of 65 chars", with_item(item(json!("s".repeat(65)), json!(1), json!(1))).to_string(), 422, "validation_failed", "items[0].sku"),
        ("sku with a newline", with_item(item(json!("a\nb"), json!(1), json!(1))).to_string(), 422, "validation_failed", "items[0].sku"),
        ("quantity 0", with_item(item(json!("a"), json!(0), json!(1))).to_string(), 422, "validation_failed", "items[0].quantity"),
        ("quantity 10001", with_item(item(json!("a"), json!(10001), json!(1))).to_string(), 422, "validation_failed", "items[0].quantity"),
        ("quantity 1.5", with_item(item(json!("a"), json!(1.5), json!(1))).to_string(), 422, "validation_failed", "items[0].quantity"),
        ("quantity a string", with_item(item(json!("a"), json!("2"), json!(1))).to_string(), 422, "validation_failed", "items[0].quantity"),
        ("quantity 1e400", r#"{"customer_id":"c","currency":"EUR","items":[{"sku":"a","quantity":1e400,"unit_price_cents":1}]}"#.into(), 422, "validation_failed", "items[0].quantity"),
        ("quantity huge", r#"{"customer_id":"c","currency":"EUR","items":[{"sku":"a","quantity":100000000000000000000,"unit_price_cents":1}]}"#.into(), 422, "validation_failed", "items[0].quantity"),
        ("negative price", with_item(item(json!("a"), json!(1), json!(-1))).to_string(), 422, "validation_failed", "items[0].unit_price_cents"),
        ("price above the cap", with_item(item(json!("a"), json!(1), json!(100_000_001))).to_string(), 422, "validation_failed", "items[0].unit_price_cents"),
        ("price null", with_item(item(json!("a"), json!(1), Value::Null)).to_string(), 422, "validation_failed", "items[0].unit_price_cents"),
    ];

    for (what, body, status, code, word) in &cases {
        let r = app.client.post_raw("/orders", body.clone(), &[]).await;
        assert_eq!(r.status().as_u16(), *status, "{what}");
        let err: Value = r
            .json()
            .await
            .unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
        assert_eq!(err["error"]["code"], *code, "{what}: {err}");
        let message = err["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(word),
            "{what}: message {message:?} should name {word:?}"
        );
    }

    // Headers and transport.
    let c = &app.client;
    let r = c
        .http
        .post(c.url("/orders"))
        .header("content-type", "text/plain")
        .body(good_order().to_string())
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 415);
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"]["code"],
        "unsupported_media_type"
    );
    let r = c
        .http
        .post(c.url("/orders"))
        .body(good_order().to_string())
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 415, "no Content-Type at all");
    let invalid_utf8 =
        b"{\"customer_id\": \"\xff\", \"currency\": \"EUR\", \"items\": []}".to_vec();
    let r = c
        .http
        .post(c.url("/orders"))
        .header("content-type", "application/json")
        .body(invalid_utf8)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 400, "invalid UTF-8");
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"]["code"],
        "malformed_json"
    );
    let big = json!({"customer_id": "c", "currency": "EUR", "items": [item(json!("x".repeat(70_000)), json!(1), json!(1))]});
    let r = c.post_raw("/orders", big.to_string(), &[]).await;
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"]["code"],
        "payload_too_large"
    );
    for header in ["Idempotency-Key", "X-Correlation-ID"] {
        let r = c
            .post_order_with(&good_order(), &[(header, "one"), (header, "two")])
            .await;
        assert_eq!(r.status(), 422, "{header} given twice");
        let err: Value = r.json().await.expect("json");
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(header),
            "{err}"
        );
    }
    for (content_type, encoding) in [
        ("application/json; charset=latin1", None),
        ("application/json", Some("gzip")),
    ] {
        let mut req = c
            .http
            .post(c.url("/orders"))
            .header("content-type", content_type)
            .body(good_order().to_string());
        if let Some(e) = encoding {
            req = req.header("content-encoding", e);
        }
        let r = req.send().await.expect("POST");
        assert_eq!(r.status(), 415, "{content_type} {encoding:?}");
        assert_eq!(
            r.json::<Value>().await.expect("json")["error"]["code"],
            "unsupported_media_type"
        );
    }
    for (header, value) in [
        ("Idempotency-Key", "k".repeat(256)),
        ("Idempotency-Key", "has space".into()),
        ("X-Correlation-ID", "c".repeat(129)),
        ("X-Correlation-ID", "tab\there".into()),
    ] {
        let r = c
            .post_order_with(&good_order(), &[(header, value.as_str())])
            .await;
        assert_eq!(r.status(), 422, "{header}: {value:?}");
        let err: Value = r.json().await.expect("json");
        assert_eq!(err["error"]["code"], "validation_failed");
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(header),
            "{err}"
        );
    }

    assert_eq!(
        db.count("SELECT count(*) FROM orders").await,
        0,
        "a refused request stored an order"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM outbox").await,
        0,
        "a refused request stored an outbox row"
    );
    // Bad input must not stop a stage (one ping may be slow on a busy machine).
    c.wait_ready().await;
    let r = c
        .http
        .post(c.url("/orders"))
        .header("content-type", "Application/JSON; charset=UTF-8")
        .body(good_order().to_string())
        .send()
        .await
        .expect("POST");
    assert_eq!(
        r.status(),
        201,
        "media type and charset are case-insensitive"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_upper_bounds_of_every_rule_are_accepted() {
    let (db, names) = (TestDb::create().await, Names::new());
    let app = TestApp::ready(base_env(&db.url(), &names)).await;
    let items: Vec<Value> = (0..100)
        .map(|_| item(json!("ß".repeat(64)), json!(10_000), json!(100_000_000)))
        .collect();
    let body = json!({"customer_id": "é".repeat(128), "currency": "JPY", "items": items});

    let r = app.client.post_order(&body).await;

    assert_eq!(r.status(), 201);
    let order: Value = r.json().await.expect("json");
    assert_eq!(order["total_cents"], 100i64 * 10_000 * 100_000_000);
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 1);
    app.stop().await;
}
