//! The order and its outbox row commit in ONE transaction: if either insert
//! fails, the client gets an error and neither row exists.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

/// Makes inserts into `table` fail for orders of `customer`, from inside the
/// transaction, as a broken trigger or a full disk would.
async fn fail_inserts_into(db: &TestDb, table: &str, customer: &str) {
    let customer_of_row = match table {
        "outbox" => "NEW.payload->'order'->>'customer_id'",
        _ => "NEW.customer_id",
    };
    db.execute(&format!(
        "CREATE FUNCTION fail_{table}() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF {customer_of_row} = '{customer}' THEN \
           RAISE EXCEPTION 'injected failure on {table} insert'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER fail_{table} BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION fail_{table}();"
    ))
    .await;
}

#[tokio::test]
async fn a_failing_outbox_insert_stores_no_order_and_tells_the_client() {
    let (db, names) = (TestDb::create().await, Names::new());
    let app = TestApp::ready(base_env(&db.url(), &names)).await;
    fail_inserts_into(&db, "outbox", "doomed").await;

    let r = app.client.post_order(&order_of("doomed")).await;

    assert_eq!(r.status(), 500);
    let err: Value = r.json().await.expect("a JSON error");
    assert_eq!(err["error"]["code"], "internal");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("nothing was written"),
        "{err}"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM orders").await,
        0,
        "the order outlived its outbox row"
    );
    assert_eq!(db.count("SELECT count(*) FROM outbox").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_failing_order_insert_stores_no_outbox_row() {
    let (db, names) = (TestDb::create().await, Names::new());
    let app = TestApp::ready(base_env(&db.url(), &names)).await;
    fail_inserts_into(&db, "orders", "doomed").await;

    let r = app.client.post_order(&order_of("doomed")).await;

    assert_eq!(r.status(), 500);
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 0);
    assert_eq!(
        db.count("SELECT count(*) FROM outbox").await,
        0,
        "an outbox row without its order"
    );
    app.stop().await;
}

#[tokio::test]
async fn one_failing_order_does_not_fail_the_orders_committed_with_it() {
    // Concurrent orders share transactions (group commit); a failing one
    // must not take the others down with it, nor slip through itself.
    let (db, names) = (TestDb::create().await, Names::new());
    let spy = Spy::on(&names.exchange).await;
    let app = TestApp::ready(base_env(&db.url(), &names)).await;
    fail_inserts_into(&db, "outbox", "doomed").await;

    let mut requests = Vec::new();
    for i in 0..60 {
        let customer = if i % 10 == 3 {
            "doomed".to_owned()
        } else {
            format!("c-{i}")
        };
        let body = order_of(&customer);
        let client = reqwest::Client::new();
        let url = app.client.url("/orders");
        requests.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .expect("POST");
            let status = r.status().as_u16();
            (customer, status, r.json::<Value>().await.expect("json"))
        }));
    }
    let mut created = Vec::new();
    for r in requests {
        let (customer, status, body) = r.await.expect("request task");
        if customer == "doomed" {
            assert_eq!(status, 500, "{body}");
        } else {
            assert_eq!(status, 201, "{customer}: {body}");
            created.push(body["id"].as_str().expect("id").to_owned());
        }
    }

    assert_eq!(created.len(), 54);
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 54);
    assert_eq!(
        db.count("SELECT count(*) FROM orders WHERE customer_id = 'doomed'")
            .await,
        0
    );
    spy.wait_for_orders(&created, Duration::from_secs(15)).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_batch_answers_every_caller_with_what_really_happened() {
    // A batch that fails is split; its parts commit one after another and
    // the callers hear together. A slow part must not push the answers past
    // an earlier caller's deadline while that caller's part has committed:
    // the caller would hear 503 for an order that is stored.
    let (db, names) = (TestDb::create().await, Names::new());
    let app = TestApp::ready(base_env(&db.url(), &names)).await;
    db.execute(
        "CREATE FUNCTION pace() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.customer_id = 'doomed' THEN RAISE EXCEPTION 'injected failure'; \
           ELSIF NEW.customer_id = 'slow' THEN PERFORM pg_sleep(1.5); \
           ELSIF NEW.customer_id = 'slower' THEN PERFORM pg_sleep(3.5); END IF; \
           RETURN NEW; END $$; \
         CREATE TRIGGER pace BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION pace();",
    )
    .await;
    let post = |customer: &'static str| {
        let client = Client::new(app.port);
        tokio::spawn(async move {
            let r = client.post_order(&order_of(customer)).await;
            let status = r.status().as_u16();
            let body: Value = r.json().await.expect("json");
            (customer, status, body)
        })
    };
    // Four slow orders hold every persist transaction for 1.5 s...
    let mut requests: Vec<_> = (0..4).map(|_| post("slow")).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...while these queue into one batch, a second apart: split, the part
    // [early, doomed] goes first and commits `early`; the part [slower, late]
    // then runs past early's deadline unless the batch's earliest deadline
    // bounds it.
    for customer in ["early", "doomed"] {
        requests.push(post(customer));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    for customer in ["slower", "late"] {
        requests.push(post(customer));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut answers = Vec::new();
    for r in requests {
        answers.push(r.await.expect("request"));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (customer, status, body) in &answers {
        let stored = db
            .count(&format!(
                "SELECT count(*) FROM orders WHERE customer_id = '{customer}'"
            ))
            .await;
        match status {
            201 => assert!(stored >= 1, "{customer}: 201 but not stored"),
            _ if *customer == "slow" => {}
            _ => assert!(
                *customer == "doomed" || body["error"]["code"] == "unavailable",
                "{customer}: {status} {body}"
            ),
        }
        if *status != 201 && *customer != "slow" {
            assert_eq!(stored, 0, "{customer}: answered {status} {body} but stored");
        }
    }
    let early = answers.iter().find(|(c, ..)| *c == "early").expect("early");
    assert_eq!(
        early.1, 201,
        "the early order's part committed: {answers:?}"
    );
    app.stop().await;
}
