//! The topology of SPEC §3, declared idempotently on every (re)connect: a durable
//! topic exchange and a durable queue bound to it with `order.#`.

use anyhow::Context as _;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};

/// The binding of the processor's queue: every order event.
pub const QUEUE_BINDING: &str = "order.#";

/// Declares the exchange, the queue and its binding.
pub async fn declare(conn: &Connection, exchange: &str, queue: &str) -> anyhow::Result<()> {
    let channel = conn.create_channel().await.context("opening a channel")?;
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            // durable: the exchange survives a broker restart, like the messages.
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring exchange {exchange:?} (durable, topic)"))?;
    declare_queue(conn, queue).await?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            QUEUE_BINDING.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("binding queue {queue:?} to {exchange:?}"))?;
    let _ = channel.close(200, "topology declared".into()).await;
    Ok(())
}

/// Declares a durable queue. A queue that already exists with other
/// arguments (a quorum queue, length limits: the operator's choice) is used as
/// it is rather than refused.
pub async fn declare_queue(conn: &Connection, queue: &str) -> anyhow::Result<()> {
    let channel = conn.create_channel().await.context("opening a channel")?;
    let declared = channel
        .queue_declare(
            queue.into(),
            // durable: queued orders survive a broker restart.
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(_) => {
            let _ = channel.close(200, "queue declared".into()).await;
            Ok(())
        }
        // 406 PRECONDITION_FAILED (it closed that channel): it exists, differently.
        Err(e) if e.to_string().contains("PRECONDITION_FAILED") => {
            let probe = conn.create_channel().await.context("opening a channel")?;
            probe
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("checking existing queue {queue:?}"))?;
            let _ = probe.close(200, "queue exists".into()).await;
            tracing::info!(queue, "using the existing queue with its own arguments");
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("declaring queue {queue:?} (durable)")),
    }
}
