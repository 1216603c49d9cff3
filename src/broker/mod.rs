//! The broker side: connecting to RabbitMQ, the topology of SPEC §3 and the
//! AMQP shape of a message. The stages own their connections; recovery after a
//! lost connection belongs to their actix Supervisor, so lapin's own
//! auto-recovery stays off (its default): one owner, never two.

pub mod message;
pub mod topology;

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

/// TCP connect plus the AMQP handshake; lapin has no overall deadline of its own.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Heartbeat asked for when `AMQP_URL` names none: a peer that went silent is
/// noticed within two of these, not after the broker's default minute.
pub const HEARTBEAT_SECS: u16 = 10;

/// Connects to `amqp_url`; `name` shows up in the broker's connection list.
pub async fn connect(amqp_url: &str, name: &str) -> anyhow::Result<Connection> {
    let mut uri = AMQPUri::from_str(amqp_url).map_err(anyhow::Error::msg)?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(HEARTBEAT_SECS);
    }
    let props = ConnectionProperties::default().with_connection_name(name.into());
    tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, props))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from the broker within {CONNECT_TIMEOUT:?}"))?
        .context("connecting to RabbitMQ")
}
