//! PersistActor: commits each order together with its outbox row.
//!
//! - **Wakes on**: [`PersistOrder`] from the `POST /orders` handler, which
//!   answers 201 only once this stage replied that the commit succeeded.
//! - **Reads/writes**: `orders` and `outbox` (and one NOTIFY) in ONE
//!   transaction: either both rows exist or neither does. Orders that arrive
//!   while transactions are in flight are queued and committed together
//!   (group commit): one transaction, one fsync and one NOTIFY for up to
//!   `PERSIST_MAX_BATCH` orders, with up to `PERSIST_MAX_TRANSACTIONS` in flight
//!   on pooled connections. A lone order is committed at once, alone.
//!   Idempotency-Keys are settled inside the same transaction by the unique
//!   constraint on `orders.idempotency_key`.
//! - **On failure**: a batch that fails for a reason other than the database
//!   being unreachable is split in halves until each failing order stands
//!   alone, so that one bad order does not fail the others; each caller gets
//!   its own answer. Nothing here is
//!   the source of truth: a queued order was not answered yet, and a crash
//!   loses only unanswered requests.
//! - **Stops**: with the actor system, after the HTTP server drained (every
//!   in-flight request has had its answer by then).
//!
//! After a commit it wakes the watcher in-process: the publisher learns of the
//! order without waiting for the NOTIFY round trip.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use diesel::result::Error as DieselError;
use diesel_async::AsyncConnection as _;
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout_at};
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::Wake;
use crate::broker::message::{ORDER_CREATED, order_created_body};
use crate::domain::order::now_micros;
use crate::domain::{NewOrder, Order, OrderStatus};
use crate::metrics::Metrics;
use crate::settings::Tuning;
use crate::status::StatusBoard;
use crate::storage::orders::{self, NewOrderRow};
use crate::storage::outbox::{self, NewOutboxRow};
use crate::storage::{self, PgPool};

/// Orders waiting for a transaction beyond this many are refused with 503
/// instead of queueing without bound.
pub const MAX_QUEUED: usize = 10_000;
/// Orders in the actor's mailbox, not yet taken into its queue.
pub const MAILBOX_CAPACITY: usize = 4096;
/// One transaction's own deadline: a database that stopped answering fails
/// the batch rather than holding its callers (the HTTP deadline is 5 s).
pub const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(4);
/// A transaction ends this long before the earliest answer due in its batch,
/// so the caller hears its real outcome rather than its own timeout.
const ANSWER_MARGIN: Duration = Duration::from_millis(250);
/// An order whose answer is due sooner than this is refused instead of being
/// started (a transaction that short would likely not finish).
const MIN_TRANSACTION_TIME: Duration = Duration::from_millis(500);
/// How often expired Idempotency-Keys are forgotten, and how many per statement.
const KEY_EXPIRY_INTERVAL: Duration = Duration::from_secs(600);
const KEY_EXPIRY_BATCH: i64 = 1000;

pub type Reply = oneshot::Sender<Result<Persisted, PersistError>>;

/// Store this order. The answer goes to `reply` before `answer_by`: the
/// transaction that stores it ends (commits or gives up) by then. A caller
/// that stopped waiting (dropped its receiver) before its transaction started
/// gets no order stored.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PersistOrder {
    pub order: NewOrder,
    pub idempotency_key: Option<String>,
    pub correlation_id: String,
    pub answer_by: Instant,
    pub reply: Reply,
}

#[derive(Debug)]
pub enum Persisted {
    /// Committed now, with its outbox row.
    Created(Order),
    /// The Idempotency-Key was used before with the same body: that order.
    Existing(Order),
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum PersistError {
    #[error("this Idempotency-Key was already used with a different request body")]
    KeyReused,
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("the order could not be stored (nothing was written): {0}")]
    Failed(String),
}

/// An order on its way into a transaction.
struct Pending {
    order: Order,
    event_id: Uuid,
    idempotency_key: Option<String>,
    answer_by: Instant,
    reply: Reply,
}

pub struct PersistActor {
    pool: PgPool,
    watcher: Recipient<Wake>,
    status: Arc<StatusBoard>,
    metrics: Arc<Metrics>,
    max_batch: usize,
    max_transactions: usize,
    key_ttl: Duration,
    queue: VecDeque<Pending>,
    in_flight: usize,
}

impl PersistActor {
    pub fn new(
        pool: PgPool,
        watcher: Recipient<Wake>,
        status: Arc<StatusBoard>,
        metrics: Arc<Metrics>,
        tuning: &Tuning,
    ) -> Self {
        Self {
            pool,
            watcher,
            status,
            metrics,
            max_batch: tuning.persist_max_batch,
            max_transactions: tuning.persist_max_transactions,
            key_ttl: tuning.idempotency_key_ttl,
            queue: VecDeque::new(),
            in_flight: 0,
        }
    }

    /// Starts transactions while there is queued work and room for them.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        while self.in_flight < self.max_transactions {
            // Callers that gave up are not stored, nor those whose answer is
            // due too soon for a transaction to finish before it.
            let too_late = Instant::now() + MIN_TRANSACTION_TIME;
            let queued = std::mem::take(&mut self.queue);
            for p in queued {
                if p.reply.is_closed() {
                    continue;
                }
                if p.answer_by <= too_late {
                    let _ = p.reply.send(Err(PersistError::Unavailable(
                        "the database did not take the order in time; retry".into(),
                    )));
                    continue;
                }
                self.queue.push_back(p);
            }
            if self.queue.is_empty() {
                return;
            }
            let n = self.queue.len().min(self.max_batch);
            let batch: Vec<Pending> = self.queue.drain(..n).collect();
            self.in_flight += 1;
            let pool = self.pool.clone();
            let metrics = self.metrics.clone();
            ctx.spawn(
                commit(pool, metrics, batch)
                    .into_actor(self)
                    .map(|created, act, ctx| {
                        act.in_flight -= 1;
                        if created {
                            act.watcher.do_send(Wake);
                        }
                        act.flush(ctx);
                    }),
            );
        }
    }
}

impl Actor for PersistActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(KEY_EXPIRY_INTERVAL, |act, ctx| {
            let pool = act.pool.clone();
            let ttl = chrono::Duration::from_std(act.key_ttl).unwrap_or(chrono::Duration::MAX);
            ctx.spawn(expire_keys(pool, ttl).into_actor(act));
        });
    }
}

impl Handler<PersistOrder> for PersistActor {
    type Result = ();

    fn handle(&mut self, msg: PersistOrder, ctx: &mut Context<Self>) {
        if !self.status.migrated() {
            let _ = msg.reply.send(Err(PersistError::Unavailable(
                "the database is not ready yet (migrations have not run)".into(),
            )));
            return;
        }
        if self.queue.len() >= MAX_QUEUED {
            let _ = msg.reply.send(Err(PersistError::Unavailable(
                "too many orders are waiting to be stored".into(),
            )));
            return;
        }
        let NewOrder {
            customer_id,
            currency,
            items,
            total_cents,
        } = msg.order;
        self.queue.push_back(Pending {
            order: Order {
                id: Uuid::new_v4(),
                status: OrderStatus::Accepted,
                correlation_id: msg.correlation_id,
                customer_id,
                currency,
                total_cents,
                items,
                created_at: now_micros(),
            },
            event_id: Uuid::new_v4(),
            idempotency_key: msg.idempotency_key,
            answer_by: msg.answer_by,
            reply: msg.reply,
        });
        self.flush(ctx);
    }
}

/// Commits a batch and answers every caller; true if any order was created.
async fn commit(pool: PgPool, metrics: Arc<Metrics>, batch: Vec<Pending>) -> bool {
    // Every transaction for this batch, the splits included, is over before
    // the first caller's answer is due: the callers are answered together,
    // after the last of them, and each must hear what really happened.
    let earliest = batch.iter().map(|p| p.answer_by).min();
    let until = earliest.map_or(Instant::now(), |t| t - ANSWER_MARGIN);
    let until = until.min(Instant::now() + TRANSACTION_TIMEOUT);
    let outcomes = match transaction(&pool, &batch, until).await {
        Ok(outcomes) => outcomes,
        Err(PersistError::Failed(why)) if batch.len() > 1 => {
            debug!(batch = batch.len(), error = %why, "batch failed; splitting it to find the failing orders");
            commit_apart(&pool, &batch, until).await
        }
        Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
    };
    let mut created = 0;
    for (pending, outcome) in batch.into_iter().zip(outcomes) {
        let order = &pending.order;
        match &outcome {
            Ok(Persisted::Created(_)) => {
                created += 1;
                info!(order.id = %order.id, outbox.id = %pending.event_id, correlation_id = %order.correlation_id, total_cents = order.total_cents, "order accepted");
            }
            Ok(Persisted::Existing(existing)) => {
                info!(order.id = %existing.id, correlation_id = %order.correlation_id, "idempotent replay: answering the existing order");
            }
            Err(PersistError::KeyReused) => {}
            Err(e) => warn!(correlation_id = %order.correlation_id, error = %e, "order not stored"),
        }
        let _ = pending.reply.send(outcome);
    }
    metrics.orders_accepted.inc_by(created);
    created > 0
}

fn classify(e: &DieselError) -> PersistError {
    if storage::is_unavailable(e) {
        PersistError::Unavailable(e.to_string())
    } else {
        PersistError::Failed(e.to_string())
    }
}

/// A failed batch, split in halves until each failing order stands alone, so
/// every caller gets its own answer: one bad order among n costs about
/// 2·log2(n) transactions, not n. Callers that gave up meanwhile are skipped,
/// so nothing is stored after its client was told it was not.
async fn commit_apart(
    pool: &PgPool,
    batch: &[Pending],
    until: Instant,
) -> Vec<Result<Persisted, PersistError>> {
    let mut outcomes: Vec<Option<Result<Persisted, PersistError>>> =
        std::iter::repeat_with(|| None).take(batch.len()).collect();
    let mid = batch.len() / 2;
    let mut parts = vec![(mid, batch.len()), (0, mid)];
    while let Some((lo, hi)) = parts.pop() {
        if let Some(gone) = (lo..hi).find(|&i| batch[i].reply.is_closed()) {
            // Leave that caller out: go on with the runs either side of it.
            parts.extend(
                [(gone + 1, hi), (lo, gone)]
                    .into_iter()
                    .filter(|(a, b)| a < b),
            );
            continue;
        }
        match transaction(pool, &batch[lo..hi], until).await {
            Ok(part) => {
                for (slot, outcome) in outcomes[lo..hi].iter_mut().zip(part) {
                    *slot = Some(outcome);
                }
            }
            Err(PersistError::Failed(_)) if hi - lo > 1 => {
                let mid = lo + (hi - lo) / 2;
                parts.extend([(mid, hi), (lo, mid)]);
            }
            Err(e) => {
                for slot in &mut outcomes[lo..hi] {
                    *slot = Some(Err(e.clone()));
                }
            }
        }
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Err(PersistError::Unavailable("the caller gave up".into()))))
        .collect()
}

/// One transaction for the whole batch: the orders, their outbox rows, one
/// NOTIFY; over (committed or abandoned) by `until`. The outcomes come in the
/// order of `batch`.
async fn transaction(
    pool: &PgPool,
    batch: &[Pending],
    until: Instant,
) -> Result<Vec<Result<Persisted, PersistError>>, PersistError> {
    let timed_out =
        || PersistError::Unavailable("no answer from the database in time; retry".to_string());
    let mut conn = match timeout_at(until, pool.get()).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(PersistError::Unavailable(e.to_string())),
        Err(_) => return Err(timed_out()),
    };
    let work = async {
        let result = conn
            .transaction::<_, DieselError, _>(async |c| {
                // Sorted by key: concurrent batches then take key locks in one
                // order and cannot deadlock on each other.
                let mut rows: Vec<NewOrderRow<'_>> = batch.iter().map(order_row).collect();
                rows.sort_by(|a, b| a.idempotency_key.cmp(&b.idempotency_key));
                let inserted: HashSet<Uuid> = orders::insert_skipping_taken_keys(c, &rows)
                    .await?
                    .into_iter()
                    .collect();

                let taken: Vec<&str> = batch
                    .iter()
                    .filter(|p| !inserted.contains(&p.order.id))
                    .filter_map(|p| p.idempotency_key.as_deref())
                    .collect();
                let existing: HashMap<String, Order> = if taken.is_empty() {
                    HashMap::new()
                } else {
                    orders::find_by_idempotency_keys(c, &taken)
                        .await?
                        .into_iter()
                        .collect()
                };

                let outbox_rows: Vec<NewOutboxRow<'_>> = batch
                    .iter()
                    .filter(|p| inserted.contains(&p.order.id))
                    .map(|p| NewOutboxRow {
                        id: p.event_id,
                        order_id: p.order.id,
                        event_type: ORDER_CREATED,
                        routing_key: ORDER_CREATED,
                        correlation_id: &p.order.correlation_id,
                        payload: order_created_body(p.event_id, &p.order),
                    })
                    .collect();
                if !outbox_rows.is_empty() {
                    outbox::insert(c, &outbox_rows).await?;
                    outbox::notify(c).await?;
                }

                Ok(batch
                    .iter()
                    .map(|p| {
                        if inserted.contains(&p.order.id) {
                            return Ok(Persisted::Created(p.order.clone()));
                        }
                        let key = p.idempotency_key.as_deref().unwrap_or_default();
                        match existing.get(key) {
                            Some(found) if found.same_request_as(&p.order) => {
                                Ok(Persisted::Existing(found.clone()))
                            }
                            Some(_) => Err(PersistError::KeyReused),
                            // The key's holder vanished between the two statements
                            // (its key just expired): the client may retry.
                            None => Err(PersistError::Unavailable(
                                "the Idempotency-Key changed hands; retry".into(),
                            )),
                        }
                    })
                    .collect())
            })
            .await;
        result.map_err(|e| classify(&e))
    };
    match timeout_at(until, work).await {
        Ok(result) => result,
        Err(_) => {
            // Its transaction never ended: close it, releasing its key locks.
            storage::discard(conn);
            Err(timed_out())
        }
    }
}

fn order_row(p: &Pending) -> NewOrderRow<'_> {
    let o = &p.order;
    NewOrderRow {
        id: o.id,
        status: OrderStatus::Accepted.as_str(),
        correlation_id: &o.correlation_id,
        customer_id: &o.customer_id,
        currency: &o.currency,
        total_cents: o.total_cents,
        items: serde_json::to_value(&o.items)
            .unwrap_or_else(|e| unreachable!("items serialise: {e}")),
        idempotency_key: p.idempotency_key.as_deref(),
        created_at: o.created_at,
    }
}

/// Forgets Idempotency-Keys older than `ttl`, a bounded batch at a time.
async fn expire_keys(pool: PgPool, ttl: chrono::Duration) {
    let before = chrono::Utc::now() - ttl;
    let Ok(mut conn) = pool.get().await else {
        return;
    };
    let mut total = 0;
    loop {
        match orders::expire_idempotency_keys(&mut conn, before, KEY_EXPIRY_BATCH).await {
            Ok(n) => {
                total += n;
                if (n as i64) < KEY_EXPIRY_BATCH {
                    break;
                }
            }
            Err(e) => {
                warn!(error = %e, "expiring Idempotency-Keys failed; next round retries");
                break;
            }
        }
    }
    if total > 0 {
        info!(expired = total, "forgot expired Idempotency-Keys");
    }
}
