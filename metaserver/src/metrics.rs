//! What the metaserver measures about itself (served by `dfs_common::metrics` when a metrics
//! address is configured).

use dfs_common::metrics::{Metrics, RequestMetrics, latency_histogram, size_histogram};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

/// The metaserver's metrics: created with the service, registered by `main` if served.
#[derive(Clone, Debug, Default)]
pub struct MetaMetrics {
    /// Every request, by type (`Lookup`, `Create`, `CommitWrite`...).
    pub requests: RequestMetrics,
    pub commit: CommitMetrics,
}

impl MetaMetrics {
    pub fn register(&self, metrics: &Metrics) {
        self.requests.register(metrics, "request", "requests");
        self.commit.register(metrics);
    }
}

/// The commit thread: how many operations share a transaction, and what it costs.
#[derive(Clone, Debug)]
pub struct CommitMetrics {
    /// Operations per transaction (group commit).
    pub batch_ops: Histogram,
    /// From the start of a transaction to its durability (log append and fdatasync included).
    pub duration: Histogram,
    /// Transactions that failed (their operations answered with an error).
    pub failures: Counter,
    /// Checkpoints of the write-ahead log into the database, and their duration.
    pub checkpoint_duration: Histogram,
}

impl Default for CommitMetrics {
    fn default() -> Self {
        CommitMetrics {
            batch_ops: size_histogram(),
            duration: latency_histogram(),
            failures: Counter::default(),
            checkpoint_duration: latency_histogram(),
        }
    }
}

impl CommitMetrics {
    fn register(&self, metrics: &Metrics) {
        metrics.register(
            "commit_batch_operations",
            "Operations committed together in one transaction",
            self.batch_ops.clone(),
        );
        metrics.register(
            "commit_duration_seconds",
            "Time from the start of a metadata transaction until it is durable",
            self.duration.clone(),
        );
        metrics.register(
            "commit_failures",
            "Metadata transactions that failed",
            self.failures.clone(),
        );
        metrics.register(
            "checkpoint_duration_seconds",
            "Time to checkpoint the write-ahead log into the database",
            self.checkpoint_duration.clone(),
        );
    }
}
