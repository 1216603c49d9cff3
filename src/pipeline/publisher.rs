//! PublisherActor: outbox rows → RabbitMQ, with publisher confirms.
//!
//! - **Wakes on**: [`Wake`] from the watcher (NOTIFY, in-process commit, timer
//!   sweep); with no wake-up at all it still looks every five sweep intervals.
//!   Right after every (re)start it replays the whole backlog, oldest first.
//! - **Reads/writes**: claims up to `PUBLISH_BATCH_SIZE` due rows with
//!   `FOR UPDATE SKIP LOCKED` in a transaction, publishes them all (mandatory,
//!   persistent, SPEC §3 properties) without waiting, then awaits their
//!   confirms under one deadline. Two batches are in flight: one records its
//!   outcome while the next is claimed, sent and confirmed; sends and confirms
//!   never overlap between batches, so messages leave in claim order and a
//!   batch's returns come back on its own confirms. In the same
//!   transaction it deletes the acked rows, marks their orders `published`
//!   (forward only) and records refusals. Only an `Ack` whose message was not
//!   returned counts as published (returns are matched by `message_id`: lapin
//!   attaches one to whichever confirm it resolves next); a nack or a return
//!   adds an attempt and an exponential
//!   back-off, and after `PUBLISH_MAX_ATTEMPTS` moves the row to `outbox_dead`;
//!   a timeout or a lost channel leaves the row untouched for the next claim.
//! - **On failure**: a broker problem (connect, channel, unconfirmed publish)
//!   ends the run; the actix Supervisor restarts the actor after a back-off and
//!   the restart reconnects, re-declares the topology and replays. lapin's own
//!   auto-recovery is off: the Supervisor is the one owner of recovery. A
//!   database problem keeps the broker connection and retries the claim with
//!   back-off, reporting itself `failing` meanwhile. A crash after the broker's confirm and before the delete commits
//!   re-publishes the same `message_id` (at-least-once; the processor dedups).
//! - **Flow control**: while the broker blocks the connection it claims nothing,
//!   so memory stays bounded by one batch.
//! - **Stops**: on [`Drain`](super::Drain) it claims no new batch, finishes the
//!   one in flight (awaits its confirms, commits), and closes the connection.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix::prelude::*;
use anyhow::{Context as _, bail};
use chrono::Utc;
use diesel::result::Error as DieselError;
use diesel_async::{AsyncConnection as _, AsyncPgConnection};
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Connection};
use lapin::{Confirmation, PublisherConfirm};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn};
use uuid::Uuid;

use super::faults::Faults;
use super::stage::{Backoff, Connected, Stage, StageActor};
use super::{Shared, Wake};
use crate::broker::{self, message, topology};
use crate::domain::OrderStatus;
use crate::status::{BrokerState, StageState, StageStatus, StatusBoard};
use crate::storage::outbox::{self, OutboxMessage};
use crate::storage::{self, orders};

/// While the broker blocks the connection, a batch keeps waiting for its
/// confirms this much longer than `PUBLISH_CONFIRM_TIMEOUT_MS` before giving up
/// on them (below the session's idle-in-transaction timeout).
pub const BLOCKED_MAX_WAIT: Duration = Duration::from_secs(60);
const _: () = assert!(
    (crate::settings::MAX_CONFIRM_TIMEOUT_MS as u128 + BLOCKED_MAX_WAIT.as_millis())
        < storage::IDLE_IN_TRANSACTION_TIMEOUT.as_millis(),
    "a batch's transaction must not idle past the server's timeout"
);
/// How often an idle or blocked publisher checks its connection.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// With no wake-up at all, look at the outbox after this many sweep intervals.
const FALLBACK_SWEEPS: u32 = 5;
/// Batches in flight at once. Two overlap one batch's database writes with
/// the next one's claim, sends and confirms: at most
/// `BATCHES_IN_FLIGHT × PUBLISH_BATCH_SIZE` messages are confirmed but not yet
/// recorded (what a crash can re-publish).
pub const BATCHES_IN_FLIGHT: usize = 2;

pub type PublisherActor = StageActor<Publisher>;

#[derive(Clone)]
pub struct Publisher {
    shared: Shared,
    wake: Arc<Notify>,
    /// Held from a batch's claim until its last confirm is in: messages leave
    /// in claim order, and every return the broker sends for a batch arrives
    /// on that batch's own confirms (none of another batch is pending). The
    /// batches in flight overlap one's database writes with the next one's
    /// claim, sends and confirms.
    send_turn: Arc<tokio::sync::Mutex<()>>,
}

impl Publisher {
    pub fn new(shared: Shared) -> Self {
        Self {
            shared,
            wake: Arc::new(Notify::new()),
            send_turn: Arc::new(tokio::sync::Mutex::new(())),
        }
    }
}

impl Handler<Wake> for PublisherActor {
    type Result = ();

    fn handle(&mut self, _: Wake, _ctx: &mut Context<Self>) {
        if Faults::take(&self.stage.shared.faults.publisher_handler_panics) {
            panic!("injected fault: panic in the publisher's Wake handler");
        }
        // Stores a permit when the run is busy: it looks again right after.
        self.stage.wake.notify_one();
    }
}

impl Stage for Publisher {
    const NAME: &'static str = "publisher";

    fn status(&self) -> &StageStatus {
        &self.shared.status.publisher
    }

    fn shared(&self) -> &Shared {
        &self.shared
    }

    async fn run(self, cancel: CancellationToken, connected: Connected) -> anyhow::Result<()> {
        let board = &self.shared.status;
        let conn = match broker::connect(&self.shared.settings.amqp_url, "order-pipeline publisher")
            .await
        {
            Ok(conn) => conn,
            Err(e) => {
                board.set_broker(BrokerState::Down);
                return Err(e);
            }
        };
        let result = self.run_connected(&conn, &cancel, &connected).await;
        if !conn.status().connected() {
            board.set_broker(BrokerState::Down);
        }
        let _ = timeout(
            Duration::from_secs(1),
            conn.close(200, "publisher stopping".into()),
        )
        .await;
        result
    }
}

/// What the broker said about one publish. A `basic.return` rides on
/// whichever confirm lapin resolves next (a multiple ack resolves its tags in
/// no fixed order), so a return is matched to its message by `message_id`,
/// never by the confirm that carried it.
enum Confirmed {
    Ack(Option<BasicReturnMessage>),
    Nack(Option<BasicReturnMessage>),
    /// No answer (timeout, lost channel, blocked too long).
    Unknown(&'static str),
    /// Never sent: the row cannot be an AMQP message (the reason).
    Invalid(String),
}

/// One claimed row on its way out.
enum Outgoing {
    Sent(PublisherConfirm, Instant),
    Invalid(String),
    /// Its publish was given up on half-way: it may reach the broker yet.
    Orphaned,
}

/// What became of one claimed message.
#[derive(Debug)]
enum Sent {
    /// Confirmed and not returned: published.
    Acked,
    /// The broker refused it (nack or return): counts as an attempt.
    Refused { reason: &'static str, error: String },
    /// Outcome unknown (timeout, lost channel, not sent): left as it was.
    Unknown { reason: &'static str },
}

#[derive(Debug, Default)]
struct BatchOutcome {
    claimed: usize,
    /// Set when the channel can no longer be trusted: the run must restart.
    channel_error: Option<String>,
}

/// A batch as the transaction recorded it, reported once it has committed.
struct Recorded {
    rows: Vec<OutboxMessage>,
    sent: Vec<Sent>,
    dead: Vec<Uuid>,
    channel_error: Option<String>,
}

impl Publisher {
    async fn run_connected(
        &self,
        conn: &Connection,
        cancel: &CancellationToken,
        connected: &Connected,
    ) -> anyhow::Result<()> {
        let s = &self.shared;
        if let Err(e) =
            topology::declare(conn, &s.settings.amqp_exchange, &s.settings.amqp_queue).await
        {
            if conn.status().connected() {
                s.status.set_broker(BrokerState::Misconfigured);
            }
            return Err(e);
        }
        let channel = conn
            .create_channel()
            .await
            .context("opening the publish channel")?;
        // Confirms: a message counts as published only when the broker acked it.
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("enabling publisher confirms")?;
        s.status.set_broker(BrokerState::Up);
        if !s.wait_migrated(cancel).await? {
            return Ok(());
        }
        s.status.publisher.set(StageState::Running);
        connected.mark();
        info!("publisher connected; replaying the outbox backlog");
        let result = self.publish_until_cancelled(conn, &channel, cancel).await;
        // Closed before the connection is: lapin logs a channel that is still
        // closing when its connection closes as a connection error.
        let _ = timeout(
            Duration::from_secs(1),
            channel.close(200, "publisher stopping".into()),
        )
        .await;
        result
    }

    async fn publish_until_cancelled(
        &self,
        conn: &Connection,
        channel: &Channel,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let s = &self.shared;
        let mut db_backoff = Backoff::new();
        let batch_size = s.settings.tuning.publish_batch_size;
        // Set once a batch lost track of a confirm: that confirm may still
        // carry a later batch's return, so nothing more is sent on the channel.
        let untrusted = AtomicBool::new(false);
        let mut in_flight = FuturesUnordered::new();
        // Set when a batch came back short: nothing more is due until a wake-up.
        let mut drained = false;
        let mut failure: Option<anyhow::Error> = None;
        loop {
            self.note_unblocked(conn);
            let stop = cancel.is_cancelled() || failure.is_some();
            let can_start = !stop && !drained && in_flight.len() < BATCHES_IN_FLIGHT;
            if can_start {
                if Faults::take(&s.faults.publisher_loop_panics) {
                    panic!("injected fault: panic in the publisher's work loop");
                }
                if !conn.status().connected() {
                    failure = Some(anyhow::anyhow!("the broker connection was lost"));
                    continue;
                }
                if !conn.status().blocked() {
                    in_flight.push(self.publish_batch(conn, channel, &untrusted, cancel));
                    continue;
                }
            }
            // Nothing more to start: wait for a batch, or for a reason to start one.
            let Some(result) = in_flight.next().await else {
                if let Some(e) = failure {
                    return Err(e);
                }
                if cancel.is_cancelled() {
                    return Ok(());
                }
                if conn.status().blocked() {
                    self.wait_unblocked(conn, cancel).await;
                } else {
                    self.idle(conn, cancel).await;
                }
                drained = false;
                continue;
            };
            match result {
                Ok(outcome) => {
                    db_backoff.reset();
                    if s.status.publisher.get() == StageState::Failing {
                        info!("outbox batches succeed again");
                        s.status.publisher.set(StageState::Running);
                    }
                    s.status.publisher.beat();
                    if let Some(error) = outcome.channel_error {
                        // Finish the other batch in flight (it records what it
                        // knows), then restart on a new channel.
                        failure.get_or_insert_with(|| {
                            anyhow::anyhow!("the publish channel failed: {error}")
                        });
                    }
                    drained |= (outcome.claimed as i64) < batch_size;
                }
                Err(e) if untrusted.load(Ordering::Acquire) => {
                    // Its record failed too, but the channel is what must go.
                    warn!(error = %format!("{e:#}"), "outbox batch failed on a channel that lost track of a confirm");
                    failure.get_or_insert_with(|| {
                        anyhow::anyhow!("the publish channel lost track of a confirm")
                    });
                }
                Err(e) => {
                    // Not a broker problem, so no restart; but not healthy either.
                    s.status.publisher.set(StageState::Failing);
                    let delay = db_backoff.next_delay();
                    warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "outbox batch failed; keeping the broker connection");
                    tokio::select! {
                        () = sleep(delay) => {}
                        () = cancel.cancelled() => {}
                    }
                }
            }
        }
    }

    /// Waits for a wake-up, checking the connection every second.
    async fn idle(&self, conn: &Connection, cancel: &CancellationToken) {
        let fallback =
            Instant::now() + self.shared.settings.tuning.sweep_interval * FALLBACK_SWEEPS;
        loop {
            tokio::select! {
                () = self.wake.notified() => return,
                () = cancel.cancelled() => return,
                () = sleep(IDLE_CHECK) => {}
            }
            self.shared.status.publisher.beat();
            self.note_unblocked(conn);
            if !conn.status().connected() || conn.status().blocked() || Instant::now() >= fallback {
                return;
            }
        }
    }

    /// A block noticed while awaiting confirms is reported at once; this
    /// reports its end, whoever noticed the start.
    fn note_unblocked(&self, conn: &Connection) {
        let board = &self.shared.status;
        if !conn.status().blocked() && board.broker() == BrokerState::Blocked {
            board.set_broker(BrokerState::Up);
            if board.publisher.get() == StageState::Blocked {
                board.publisher.set(StageState::Running);
            }
            info!("the broker unblocked the connection; publishing again");
        }
    }

    /// Claims nothing while the broker blocks the connection.
    async fn wait_unblocked(&self, conn: &Connection, cancel: &CancellationToken) {
        let board = &self.shared.status;
        board.set_broker(BrokerState::Blocked);
        board.publisher.set(StageState::Blocked);
        warn!(
            "the broker blocked the connection (flow control); claiming nothing until it unblocks"
        );
        while conn.status().blocked() && conn.status().connected() && !cancel.is_cancelled() {
            tokio::select! {
                () = sleep(Duration::from_millis(100)) => {}
                () = cancel.cancelled() => {}
            }
            board.publisher.beat();
        }
        if conn.status().connected() {
            self.note_unblocked(conn);
        }
    }

    /// One claim → publish → confirm → record cycle, in one transaction.
    async fn publish_batch(
        &self,
        conn: &Connection,
        channel: &Channel,
        untrusted: &AtomicBool,
        cancel: &CancellationToken,
    ) -> anyhow::Result<BatchOutcome> {
        let s = &self.shared;
        let tuning = &s.settings.tuning;
        // Bounds the whole transaction even if the database stops answering.
        let deadline = tuning.confirm_timeout + BLOCKED_MAX_WAIT + storage::STATEMENT_TIMEOUT * 4;
        // Waited for before the transaction begins, so a waiting batch holds
        // no database connection.
        let mut turn = Some(self.send_turn.lock().await);
        let lost_track = untrusted.load(Ordering::Acquire);
        if lost_track || cancel.is_cancelled() {
            // The run restarts on a new channel (or is stopping): claim nothing.
            return Ok(BatchOutcome {
                claimed: 0,
                channel_error: lost_track
                    .then(|| "an earlier batch lost track of a confirm".into()),
            });
        }
        let mut db = s
            .pool
            .get()
            .await
            .context("getting a database connection")?;
        let work = db.transaction::<_, DieselError, _>(async |c| {
            let rows = outbox::claim_due(c, tuning.publish_batch_size).await?;
            if rows.is_empty() {
                return Ok(None);
            }
            let (confirms, send_error) = self.send(conn, channel, &rows).await;
            let (sent, channel_error) = self.confirm(conn, confirms, send_error, &rows).await;
            if channel_error.is_some() {
                untrusted.store(true, Ordering::Release);
            }
            // Every confirm is in: the next batch may claim and send while
            // this one records its outcome.
            turn.take();
            let dead = self.record(c, &rows, &sent).await?;
            Ok(Some(Recorded {
                rows,
                sent,
                dead,
                channel_error,
            }))
        });
        let recorded = match timeout(deadline, work).await {
            Ok(result) => result.context("claiming or recording an outbox batch")?,
            Err(_) => {
                // Closed now, not whenever the pool next hands it out: closing
                // ends its transaction on the server and frees the claimed rows.
                storage::discard(db);
                bail!("an outbox batch took longer than {deadline:?}");
            }
        };
        let Some(recorded) = recorded else {
            return Ok(BatchOutcome::default());
        };
        self.report(&recorded);
        Ok(BatchOutcome {
            claimed: recorded.rows.len(),
            channel_error: recorded.channel_error,
        })
    }

    /// Publishes every row without waiting for confirms; stops at the first
    /// row the channel does not take (the error says why, if it is one).
    async fn send(
        &self,
        conn: &Connection,
        channel: &Channel,
        rows: &[OutboxMessage],
    ) -> (Vec<Outgoing>, Option<String>) {
        let settings = &self.shared.settings;
        let exchange: lapin::types::ShortString = settings.amqp_exchange.as_str().into();
        let deadline = Instant::now() + settings.tuning.confirm_timeout;
        let mut confirms = Vec::with_capacity(rows.len());
        for row in rows {
            if let Some(why) = message::unpublishable(row) {
                confirms.push(Outgoing::Invalid(why));
                continue;
            }
            let body = serde_json::to_vec(&row.payload)
                .unwrap_or_else(|e| unreachable!("JSON serialises: {e}"));
            let publish = channel.basic_publish(
                exchange.clone(),
                row.routing_key.as_str().into(),
                // mandatory: an unroutable message comes back instead of vanishing.
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &body,
                message::properties(row),
            );
            match timeout_at(deadline, publish).await {
                Ok(Ok(confirm)) => confirms.push(Outgoing::Sent(confirm, deadline)),
                Ok(Err(e)) => return (confirms, Some(format!("publish failed: {e}"))),
                // The publish given up on may still go out, with a confirm
                // nobody awaits that could take one of this batch's returns:
                // the unsent rows stay for later, nothing of this batch counts
                // as published, and the channel is replaced.
                Err(_) => {
                    confirms.push(Outgoing::Orphaned);
                    let error = if conn.status().blocked() {
                        "the broker blocked the connection during a publish"
                    } else {
                        "a publish was not accepted before the confirm deadline"
                    };
                    return (confirms, Some(error.into()));
                }
            }
        }
        (confirms, None)
    }

    /// Awaits the confirms of a batch's sent messages and tells each row's
    /// outcome; the rows after the last sent one are "not sent". A return
    /// counts against the row its `message_id` names.
    async fn confirm(
        &self,
        conn: &Connection,
        confirms: Vec<Outgoing>,
        mut channel_error: Option<String>,
        rows: &[OutboxMessage],
    ) -> (Vec<Sent>, Option<String>) {
        let mut answers = Vec::with_capacity(rows.len());
        let mut ambiguous = false;
        for outgoing in confirms {
            answers.push(match outgoing {
                Outgoing::Sent(confirm, deadline) => {
                    await_confirm(conn, confirm, deadline, &self.shared.status).await
                }
                Outgoing::Invalid(why) => Confirmed::Invalid(why),
                Outgoing::Orphaned => {
                    ambiguous = true;
                    Confirmed::Unknown("not_sent")
                }
            });
        }
        let mut returned: HashMap<String, String> = HashMap::new();
        for answer in &answers {
            if let Confirmed::Ack(Some(r)) | Confirmed::Nack(Some(r)) = answer {
                let id = r.properties.message_id().as_ref().map(|id| id.to_string());
                let why = format!(
                    "returned by the broker as unroutable: {} {}",
                    r.reply_code, r.reply_text
                );
                returned.insert(id.unwrap_or_default(), why);
            }
        }
        let mut sent: Vec<Sent> = rows
            .iter()
            .zip(answers.iter().map(Some).chain(std::iter::repeat(None)))
            .map(
                |(row, answer)| match (returned.remove(&row.id.to_string()), answer) {
                    (_, None) => Sent::Unknown { reason: "not_sent" },
                    (Some(error), Some(_)) => Sent::Refused {
                        reason: "returned",
                        error,
                    },
                    (None, Some(Confirmed::Ack(_))) => Sent::Acked,
                    (None, Some(Confirmed::Nack(_))) => Sent::Refused {
                        reason: "nack",
                        error: "nacked by the broker".into(),
                    },
                    (None, Some(Confirmed::Unknown(reason))) => Sent::Unknown { reason },
                    (None, Some(Confirmed::Invalid(error))) => Sent::Refused {
                        reason: "invalid",
                        error: error.clone(),
                    },
                },
            )
            .collect();
        if !returned.is_empty() || ambiguous {
            // A return for no message of this batch, or a publish whose
            // confirm nobody awaits: attribution cannot be trusted, so
            // nothing of it counts as published (re-sent later).
            for s in sent.iter_mut().filter(|s| matches!(s, Sent::Acked)) {
                *s = Sent::Unknown {
                    reason: "ambiguous",
                };
            }
            channel_error.get_or_insert_with(|| "a return for a message of no batch".into());
        }
        if channel_error.is_none()
            && sent.iter().any(|s| {
                matches!(
                    s,
                    Sent::Unknown {
                        reason: "channel" | "timeout" | "blocked"
                    }
                )
            })
        {
            channel_error = Some("confirms were lost or late".into());
        }
        (sent, channel_error)
    }

    /// Records a batch's outcome in the claiming transaction; returns the ids it
    /// dead-lettered.
    async fn record(
        &self,
        c: &mut AsyncPgConnection,
        rows: &[OutboxMessage],
        sent: &[Sent],
    ) -> Result<Vec<Uuid>, DieselError> {
        let s = &self.shared;
        let tuning = &s.settings.tuning;
        let mut acked_ids = Vec::new();
        let mut acked_orders = Vec::new();
        let mut refusals: Vec<(Uuid, String)> = Vec::new();
        let mut invalid = Vec::new();
        for (row, outcome) in rows.iter().zip(sent) {
            let span = info_span!("outbox_message", outbox.id = %row.id, order.id = %row.order_id, correlation_id = %row.correlation_id);
            let _entered = span.enter();
            match outcome {
                Sent::Acked => {
                    acked_ids.push(row.id);
                    acked_orders.push(row.order_id);
                }
                Sent::Refused { reason, error } => {
                    if *reason == "invalid" {
                        warn!(error = %error, "an outbox row that can never be published; dead-lettered");
                        invalid.push(row.id);
                    } else {
                        warn!(reason, error = %error, attempts = row.attempts + 1, "the broker refused the message; it stays in the outbox");
                    }
                    s.metrics.publish_failure(reason, 1);
                    refusals.push((row.id, error.clone()));
                }
                Sent::Unknown { reason } => {
                    s.metrics.publish_failure(reason, 1);
                }
            }
        }
        outbox::delete(c, &acked_ids).await?;
        orders::advance_status(c, &acked_orders, OrderStatus::Published).await?;
        outbox::record_refusals(
            c,
            &refusals,
            tuning.publish_retry_base,
            tuning.publish_retry_max,
        )
        .await?;
        // A row that can never be a message is dead-lettered at once.
        let mut dead = outbox::dead_letter_exhausted(c, &invalid, 0).await?;
        let refused_ids: Vec<Uuid> = refusals
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !invalid.contains(id))
            .collect();
        dead.extend(
            outbox::dead_letter_exhausted(c, &refused_ids, tuning.publish_max_attempts).await?,
        );
        Ok(dead)
    }

    /// Logs and counts a committed batch.
    fn report(
        &self,
        Recorded {
            rows, sent, dead, ..
        }: &Recorded,
    ) {
        let s = &self.shared;
        let now = Utc::now();
        let mut published = 0;
        for (row, outcome) in rows.iter().zip(sent) {
            if matches!(outcome, Sent::Acked) {
                let latency = (now - row.created_at).to_std().unwrap_or_default();
                s.metrics
                    .commit_to_confirm_seconds
                    .observe(latency.as_secs_f64());
                published += 1;
                info!(
                    outbox.id = %row.id, order.id = %row.order_id, correlation_id = %row.correlation_id,
                    publish.latency_ms = latency.as_millis() as u64,
                    "order published"
                );
            }
        }
        for id in dead {
            warn!(outbox.id = %id, max_attempts = s.settings.tuning.publish_max_attempts, "message moved to outbox_dead (refused too often, or never publishable)");
        }
        s.metrics.messages_published.inc_by(published);
        s.metrics.messages_dead_lettered.inc_by(dead.len() as u64);
    }
}

/// Awaits one confirm until `deadline`, longer while the broker blocks us.
async fn await_confirm(
    conn: &Connection,
    confirm: PublisherConfirm,
    deadline: Instant,
    board: &StatusBoard,
) -> Confirmed {
    let mut confirm = pin!(confirm);
    let give_up = deadline + BLOCKED_MAX_WAIT;
    let mut until = deadline;
    loop {
        match timeout_at(until, confirm.as_mut()).await {
            Ok(Ok(Confirmation::Ack(returned))) => return Confirmed::Ack(returned),
            Ok(Ok(Confirmation::Nack(returned))) => return Confirmed::Nack(returned),
            Ok(Ok(Confirmation::NotRequested) | Err(_)) => return Confirmed::Unknown("channel"),
            Err(_) if conn.status().blocked() && Instant::now() < give_up => {
                // Say so now, not only once this batch is given up on.
                board.set_broker(BrokerState::Blocked);
                board.publisher.set(StageState::Blocked);
                until = (Instant::now() + IDLE_CHECK).min(give_up);
            }
            Err(_) if conn.status().blocked() => return Confirmed::Unknown("blocked"),
            Err(_) => return Confirmed::Unknown("timeout"),
        }
    }
}
