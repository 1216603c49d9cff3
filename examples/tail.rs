//! Prints every order message the service publishes, as it arrives:
//! `cargo run --example tail` (same AMQP_URL / AMQP_EXCHANGE as the service).
//!
//! It binds a temporary queue of its own to the exchange, so it sees the
//! messages without taking them from the order processor's queue.

use futures_util::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let exchange = std::env::var("AMQP_EXCHANGE").unwrap_or_else(|_| "orders".into());
    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await?;
    let temporary = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let queue = ch
        .queue_declare("".into(), temporary, FieldTable::default())
        .await?;
    ch.queue_bind(
        queue.name().clone(),
        exchange.as_str().into(),
        "order.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut deliveries = ch
        .basic_consume(
            queue.name().clone(),
            "tail".into(),
            no_ack,
            FieldTable::default(),
        )
        .await?;
    eprintln!("tailing exchange {exchange:?} (Ctrl-C to stop)");
    while let Some(delivery) = deliveries.next().await {
        let d = delivery?;
        let p = &d.properties;
        println!(
            "{} message_id={} correlation_id={} {}",
            d.routing_key,
            p.message_id().as_ref().map(|s| s.as_str()).unwrap_or("-"),
            p.correlation_id()
                .as_ref()
                .map(|s| s.as_str())
                .unwrap_or("-"),
            String::from_utf8_lossy(&d.data)
        );
    }
    Ok(())
}
