//! order-pipeline: takes orders over REST and gets every one of them to
//! RabbitMQ through a transactional outbox. See `pipeline` for the stages.
#![forbid(unsafe_code)]

pub mod broker;
pub mod domain;
pub mod error;
pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod settings;
pub mod startup;
pub mod status;
pub mod storage;
pub mod telemetry;
