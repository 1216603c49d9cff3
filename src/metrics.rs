//! Prometheus metrics (SPEC §2 `/metrics`), all prefixed `order_pipeline_`.
//!
//! Counters and the latency histogram are updated where things happen; the
//! outbox gauges are read from the database when `/metrics` is scraped, so they
//! are true even for rows written by another process.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub orders_accepted: Counter,
    pub outbox_pending: Gauge,
    pub outbox_oldest_pending_age: Gauge<f64, AtomicU64>,
    pub outbox_dead: Gauge,
    pub messages_published: Counter,
    pub publish_failures: Family<ReasonLabels, Counter>,
    pub messages_dead_lettered: Counter,
    pub stage_restarts: Family<StageLabels, Counter>,
    pub commit_to_confirm_seconds: Histogram,
    pub processor_processed: Counter,
    pub processor_duplicates_dropped: Counter,
    pub processor_dead_lettered: Counter,
    pub processor_dead_letter_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("order_pipeline");
        let m = Self {
            http_requests: Family::default(),
            orders_accepted: Counter::default(),
            outbox_pending: Gauge::default(),
            outbox_oldest_pending_age: Gauge::default(),
            outbox_dead: Gauge::default(),
            messages_published: Counter::default(),
            publish_failures: Family::default(),
            messages_dead_lettered: Counter::default(),
            stage_restarts: Family::default(),
            // 1 ms .. ~65 s: from a hot pipeline to a broker outage.
            commit_to_confirm_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17),
            ),
            processor_processed: Counter::default(),
            processor_duplicates_dropped: Counter::default(),
            processor_dead_lettered: Counter::default(),
            processor_dead_letter_failures: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            m.http_requests.clone(),
        );
        registry.register(
            "orders_accepted",
            "Orders committed with their outbox row",
            m.orders_accepted.clone(),
        );
        registry.register(
            "outbox_pending",
            "Outbox messages not yet confirmed by the broker",
            m.outbox_pending.clone(),
        );
        registry.register(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest pending outbox message (0 when empty)",
            m.outbox_oldest_pending_age.clone(),
        );
        registry.register(
            "outbox_dead",
            "Dead-lettered outbox messages",
            m.outbox_dead.clone(),
        );
        registry.register(
            "messages_published",
            "Messages confirmed by the broker",
            m.messages_published.clone(),
        );
        registry.register(
            "publish_failures",
            "Messages not published on an attempt, by reason (nack, returned, timeout, channel)",
            m.publish_failures.clone(),
        );
        registry.register(
            "messages_dead_lettered",
            "Outbox messages moved to the dead-letter table",
            m.messages_dead_lettered.clone(),
        );
        registry.register(
            "stage_restarts",
            "Restarts of a pipeline stage by its supervisor",
            m.stage_restarts.clone(),
        );
        registry.register(
            "commit_to_confirm_seconds",
            "From the order's commit to the broker's confirm of its message",
            m.commit_to_confirm_seconds.clone(),
        );
        registry.register(
            "processor_processed",
            "Orders processed by the order processor",
            m.processor_processed.clone(),
        );
        registry.register(
            "processor_duplicates_dropped",
            "Deliveries dropped by the processor as duplicates (inbox hit)",
            m.processor_duplicates_dropped.clone(),
        );
        registry.register(
            "processor_dead_lettered",
            "Deliveries the processor could never handle, sent to its dead-letter queue",
            m.processor_dead_lettered.clone(),
        );
        registry.register(
            "processor_dead_letter_failures",
            "Poison deliveries the dead-letter queue refused; each goes back to the main queue after a pause",
            m.processor_dead_letter_failures.clone(),
        );
        Self { registry, ..m }
    }

    pub fn publish_failure(&self, reason: &'static str, n: u64) {
        self.publish_failures
            .get_or_create(&ReasonLabels { reason })
            .inc_by(n);
    }

    pub fn stage_restarted(&self, stage: &'static str) {
        self.stage_restarts
            .get_or_create(&StageLabels { stage })
            .inc();
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
