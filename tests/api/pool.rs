//! The shared Postgres pool serves every stage and HTTP worker, each on a
//! runtime of its own: a connection must not depend on the one that opened it.

use diesel_async::RunQueryDsl as _;
use order_pipeline::storage;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_outlives_the_runtime_that_opened_it() {
    let db = TestDb::create().await;
    let pool = storage::build_pool(&db.url(), 4).expect("pool");

    // Opened on a runtime that then shuts down, as an HTTP worker's does when
    // the server stops first at shutdown, while a stage holds the connection
    // (the publisher across its last batch).
    let conn = std::thread::spawn({
        let pool = pool.clone();
        move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let conn = rt.block_on(pool.get()).expect("a connection");
            drop(rt);
            conn
        }
    })
    .join()
    .expect("the short-lived runtime");

    let mut conn = conn;
    let one: i32 = diesel::select(diesel::dsl::sql::<diesel::sql_types::Integer>("1"))
        .get_result(&mut conn)
        .await
        .expect("a query on a connection whose opener's runtime has ended");
    assert_eq!(one, 1);
    drop(conn);
    drop(pool);
}
