//! What a storage daemon measures about itself (served by `dfs_common::metrics` when a metrics
//! address is configured).

use dfs_common::metrics::{Metrics, RequestMetrics, latency_histogram};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

#[derive(Clone, Debug)]
pub struct StorageMetrics {
    /// Every request, by type (`WritePiece`, `ReadPiece`, `Ping`).
    pub requests: RequestMetrics,
    pub bytes_written: Counter,
    pub bytes_read: Counter,
    /// From the end of a piece's stream until the piece is durable and in place (the fsyncs).
    pub piece_durable: Histogram,
}

impl Default for StorageMetrics {
    fn default() -> Self {
        StorageMetrics {
            requests: RequestMetrics::default(),
            bytes_written: Counter::default(),
            bytes_read: Counter::default(),
            piece_durable: latency_histogram(),
        }
    }
}

impl StorageMetrics {
    pub fn register(&self, metrics: &Metrics) {
        self.requests.register(metrics, "request", "requests");
        metrics.register(
            "written_bytes",
            "Piece bytes received from clients and stored",
            self.bytes_written.clone(),
        );
        metrics.register("read_bytes", "Piece bytes served to readers", self.bytes_read.clone());
        metrics.register(
            "piece_durable_duration_seconds",
            "Time from the end of a piece's stream until it is durable and in place",
            self.piece_durable.clone(),
        );
    }
}
