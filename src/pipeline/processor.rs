//! ProcessorActor: the pipeline's last stage, processing each order exactly once.
//!
//! - **Wakes on**: deliveries from `$AMQP_QUEUE` (manual acks, prefetch
//!   `PROCESSOR_PREFETCH`). Whatever is already buffered is taken as one batch.
//! - **Reads/writes**: in ONE transaction per batch it records each message id
//!   in `inbox` (a repeat is dropped by the primary key, not by a read before the
//!   write) and marks the order `processed` (forward only). Only after the
//!   commit does it ack, with one `multiple` ack for the batch. A crash between
//!   commit and ack redelivers, and the inbox drops the repeat: exactly one
//!   effect per order.
//! - **Poison**: a delivery that can never be processed (no `message_id`, a body
//!   that is not the event JSON, an unknown order) is published with confirms to
//!   its dead-letter queue `$AMQP_QUEUE.dead-letter` (declared on first use; reason in the
//!   `x-death-reason` header) and then acked: never redelivered in a hot loop,
//!   never silently dropped. (Re-publishing instead of `reject` keeps the main
//!   queue free of dead-letter arguments, so an operator's own declaration of it
//!   is never contradicted.)
//! - **On failure**: a database or broker error ends the run without acking; the
//!   broker requeues the unacked deliveries when the channel closes, and the
//!   Supervisor reconnects after a back-off.
//! - **Stops**: on [`Drain`](super::Drain) it finishes and acks the batch in hand,
//!   then closes the channel; deliveries prefetched but not started are requeued.

use std::cell::Cell;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use diesel::result::Error as DieselError;
use diesel_async::AsyncConnection as _;
use futures_util::{FutureExt as _, StreamExt as _};
use lapin::Confirmation;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn};
use uuid::Uuid;

use super::Shared;
use super::stage::{Connected, Stage, StageActor};
use crate::broker::{self, message::IncomingEvent, topology};
use crate::domain::OrderStatus;
use crate::status::{StageState, StageStatus};
use crate::storage::{self, inbox, orders};

/// A batch's transaction, bounded even if the database stops answering.
const BATCH_DEADLINE: Duration = Duration::from_secs(15);
/// Dead-lettering waits this long for the broker's confirm.
const DEAD_LETTER_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a poison delivery the dead-letter queue refused is held before it
/// goes back to the main queue (to be tried again).
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(5);
/// An idle processor still reports that it is alive this often.
const IDLE_BEAT: Duration = Duration::from_secs(5);

pub type ProcessorActor = StageActor<Processor>;

#[derive(Clone)]
pub struct Processor {
    shared: Shared,
}

impl Processor {
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }
}

impl Stage for Processor {
    const NAME: &'static str = "processor";

    fn status(&self) -> &StageStatus {
        &self.shared.status.processor
    }

    fn shared(&self) -> &Shared {
        &self.shared
    }

    async fn run(self, cancel: CancellationToken, connected: Connected) -> anyhow::Result<()> {
        let conn =
            broker::connect(&self.shared.settings.amqp_url, "order-pipeline processor").await?;
        let result = self.run_connected(&conn, &cancel, &connected).await;
        let _ = timeout(
            Duration::from_secs(1),
            conn.close(200, "processor stopping".into()),
        )
        .await;
        result
    }
}

/// A delivery and what the processor made of it.
struct Parsed {
    delivery: Delivery,
    outcome: Result<(String, Uuid), &'static str>,
}

impl Processor {
    async fn run_connected(
        &self,
        conn: &Connection,
        cancel: &CancellationToken,
        connected: &Connected,
    ) -> anyhow::Result<()> {
        let settings = &self.shared.settings;
        topology::declare(conn, &settings.amqp_exchange, &settings.amqp_queue).await?;

        let channel = conn
            .create_channel()
            .await
            .context("opening the consume channel")?;
        // Bounded prefetch: at most this many unacked deliveries in memory.
        channel
            .basic_qos(
                settings.tuning.processor_prefetch,
                BasicQosOptions::default(),
            )
            .await
            .context("setting the prefetch")?;
        let dead_letters = DeadLetters {
            conn,
            channel: conn
                .create_channel()
                .await
                .context("opening the dead-letter channel")?,
            queue: settings.processor_dead_letter_queue(),
            declared: Cell::new(false),
            held_back: Arc::default(),
        };
        dead_letters
            .channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("enabling confirms for dead-lettering")?;
        if !self.shared.wait_migrated(cancel).await? {
            return Ok(());
        }
        let consumer = channel
            .basic_consume(
                settings.amqp_queue.as_str().into(),
                format!("order-pipeline-processor-{}", Uuid::new_v4()).into(),
                // Manual acks: a delivery is acked only after its commit.
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("starting to consume")?;
        self.shared.status.processor.set(StageState::Running);
        connected.mark();
        info!(queue = %settings.amqp_queue, "processor consuming");

        let result = self
            .consume_until_cancelled(&channel, &dead_letters, consumer, cancel)
            .await;
        // Closing the channel requeues what was prefetched but not acked. Closed
        // before the connection is: lapin logs a channel still closing when its
        // connection closes as a connection error.
        for ch in [&channel, &dead_letters.channel] {
            let _ = timeout(
                Duration::from_secs(1),
                ch.close(200, "processor stopping".into()),
            )
            .await;
        }
        result
    }

    async fn consume_until_cancelled(
        &self,
        channel: &Channel,
        dead_letters: &DeadLetters<'_>,
        mut consumer: lapin::Consumer,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let max_batch = usize::from(self.shared.settings.tuning.processor_prefetch);
        loop {
            let first = tokio::select! {
                d = consumer.next() => d,
                () = cancel.cancelled() => return Ok(()),
                () = tokio::time::sleep(IDLE_BEAT) => {
                    self.shared.status.processor.beat();
                    continue;
                }
            };
            let mut batch = vec![first.context("the broker cancelled the consumer")??];
            let mut consumer_error = None;
            while batch.len() < max_batch {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(delivery))) => batch.push(delivery),
                    Some(Some(Err(e))) => {
                        consumer_error = Some(e);
                        break;
                    }
                    Some(None) | None => break,
                }
            }
            self.process_batch(channel, dead_letters, batch).await?;
            self.shared.status.processor.beat();
            if let Some(e) = consumer_error {
                return Err(e).context("the consumer failed");
            }
        }
    }

    async fn process_batch(
        &self,
        channel: &Channel,
        dead_letters: &DeadLetters<'_>,
        batch: Vec<Delivery>,
    ) -> anyhow::Result<()> {
        let last_tag = batch.last().map(|d| d.delivery_tag).unwrap_or_default();
        let mut parsed: Vec<Parsed> = batch
            .into_iter()
            .map(|delivery| {
                let outcome = parse(&delivery);
                Parsed { delivery, outcome }
            })
            .collect();

        let candidates: Vec<(String, Uuid)> = parsed
            .iter()
            .filter_map(|p| p.outcome.clone().ok())
            .collect();
        let (known, fresh) = if candidates.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            let mut db = self
                .shared
                .pool
                .get()
                .await
                .context("getting a database connection")?;
            let work = db.transaction::<_, DieselError, _>(async |c| {
                let order_ids: Vec<Uuid> = candidates.iter().map(|(_, id)| *id).collect();
                let known = orders::existing_ids(c, &order_ids).await?;
                let entries: Vec<(String, Uuid)> = candidates
                    .iter()
                    .filter(|(_, id)| known.contains(id))
                    .cloned()
                    .collect();
                let fresh = inbox::record_new(c, &entries).await?;
                let fresh_orders: Vec<Uuid> = entries
                    .iter()
                    .filter(|(message_id, _)| fresh.contains(message_id))
                    .map(|(_, order_id)| *order_id)
                    .collect();
                orders::advance_status(c, &fresh_orders, OrderStatus::Processed).await?;
                Ok((known, fresh))
            });
            match timeout(BATCH_DEADLINE, work).await {
                Ok(result) => result.context("recording a batch in the inbox")?,
                Err(_) => {
                    storage::discard(db);
                    bail!("processing a batch took longer than {BATCH_DEADLINE:?}");
                }
            }
        };

        let metrics = &self.shared.metrics;
        let mut seen_fresh = std::collections::HashSet::new();
        for p in &mut parsed {
            let correlation_id = p
                .delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_default();
            match &p.outcome {
                Ok((_, order_id)) if !known.contains(order_id) => p.outcome = Err("unknown order"),
                Ok((message_id, order_id)) => {
                    let span = info_span!("delivery", message_id = %message_id, order.id = %order_id, correlation_id = %correlation_id);
                    let _entered = span.enter();
                    if fresh.contains(message_id) && seen_fresh.insert(message_id.clone()) {
                        metrics.processor_processed.inc();
                        info!("order processed");
                    } else {
                        metrics.processor_duplicates_dropped.inc();
                        info!("duplicate delivery dropped");
                    }
                }
                Err(_) => {}
            }
        }

        // A poison delivery the dead-letter queue does not take goes back to
        // the main queue after a pause, instead of holding back every
        // delivery behind it (the batch is then acked one by one).
        let mut held_back = Vec::new();
        for p in parsed.iter().filter(|p| p.outcome.is_err()) {
            let reason = p.outcome.as_ref().err().copied().unwrap_or("unprocessable");
            let message_id = p
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string());
            match dead_letters.send(&p.delivery, reason).await {
                Ok(()) => {
                    metrics.processor_dead_lettered.inc();
                    warn!(
                        reason,
                        message_id = ?message_id,
                        dead_letter_queue = %dead_letters.queue,
                        "undeliverable message moved to the dead-letter queue"
                    );
                }
                Err(e) if !dead_letters.channel.status().connected() => {
                    return Err(e).context("the dead-letter channel closed");
                }
                Err(e) => {
                    metrics.processor_dead_letter_failures.inc();
                    dead_letters.declared.set(false);
                    warn!(
                        reason,
                        message_id = ?message_id,
                        error = %format!("{e:#}"),
                        retry_in_ms = DEAD_LETTER_RETRY.as_millis() as u64,
                        "the dead-letter queue refused an undeliverable message; it goes back to the queue"
                    );
                    held_back.push(p.delivery.delivery_tag);
                }
            }
        }

        let any_held = !dead_letters.held().is_empty();
        if held_back.is_empty() && !any_held {
            channel
                .basic_ack(last_tag, BasicAckOptions { multiple: true })
                .await
                .context("acking a batch")?;
            return Ok(());
        }
        for p in parsed
            .iter()
            .filter(|p| !held_back.contains(&p.delivery.delivery_tag))
        {
            channel
                .basic_ack(p.delivery.delivery_tag, BasicAckOptions { multiple: false })
                .await
                .context("acking a delivery")?;
        }
        if held_back.is_empty() {
            return Ok(());
        }
        dead_letters.held().extend(held_back.iter().copied());
        let (channel, held) = (channel.clone(), dead_letters.held_back.clone());
        tokio::spawn(async move {
            tokio::time::sleep(DEAD_LETTER_RETRY).await;
            for tag in held_back {
                // If the channel is gone by then, the broker requeued it anyway.
                let requeue = BasicNackOptions {
                    multiple: false,
                    requeue: true,
                };
                let _ = channel.basic_nack(tag, requeue).await;
                held.lock().unwrap_or_else(|e| e.into_inner()).remove(&tag);
            }
        });
        Ok(())
    }
}

/// The message id and order id of a delivery, or why it can never be processed.
fn parse(delivery: &Delivery) -> Result<(String, Uuid), &'static str> {
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.to_string())
        .filter(|m| !m.is_empty())
        .ok_or("no message_id")?;
    let event: IncomingEvent =
        serde_json::from_slice(&delivery.data).map_err(|_| "body is not an order event")?;
    Ok((message_id, event.order.id))
}

/// The processor's dead-letter queue, declared on first use: a run that never
/// meets a poison message leaves no extra queue behind.
struct DeadLetters<'a> {
    conn: &'a Connection,
    /// In confirm mode.
    channel: Channel,
    queue: String,
    declared: Cell<bool>,
    /// Delivery tags refused by the dead-letter queue and not yet handed back
    /// to the main queue: while any is held, acks name single deliveries (a
    /// multiple ack would take the held ones with it).
    held_back: Arc<Mutex<HashSet<u64>>>,
}

impl DeadLetters<'_> {
    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.held_back.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a copy of `delivery` to the dead-letter queue and waits for the
    /// broker's confirm; the caller acks the original only after that.
    async fn send(&self, delivery: &Delivery, reason: &str) -> anyhow::Result<()> {
        if !self.declared.get() {
            topology::declare_queue(self.conn, &self.queue).await?;
            self.declared.set(true);
        }
        publish_dead_letter(&self.channel, &self.queue, delivery, reason).await
    }
}

async fn publish_dead_letter(
    channel: &Channel,
    queue: &str,
    delivery: &Delivery,
    reason: &str,
) -> anyhow::Result<()> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        "x-death-reason".into(),
        AMQPValue::LongString(reason.into()),
    );
    headers.insert(
        "x-original-routing-key".into(),
        AMQPValue::LongString(delivery.routing_key.as_str().into()),
    );
    let properties = delivery.properties.clone().with_headers(headers);
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            // mandatory: if the dead-letter queue is gone, we hear about it.
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &delivery.data,
            properties,
        )
        .await
        .context("dead-lettering")?;
    match timeout(DEAD_LETTER_CONFIRM_TIMEOUT, confirm).await {
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(other)) => bail!("the broker did not take the dead letter: {other:?}"),
        Ok(Err(e)) => Err(e).context("dead-lettering"),
        Err(_) => bail!("no confirm for a dead letter within {DEAD_LETTER_CONFIRM_TIMEOUT:?}"),
    }
}
