//! Prometheus metrics. Each process keeps one [`Metrics`] registry, times every request it
//! serves per operation ([`RequestMetrics`]), and serves the OpenMetrics text format on an HTTP
//! address from its config ([`serve`]); off unless configured.
//!
//! Names follow Prometheus conventions: `dfs_<process>_<what>_<unit>`, counters end in
//! `_total` (added by the encoder), durations are in seconds.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

/// Scrapes served at once; more wait for their turn.
const MAX_SCRAPES: usize = 8;
/// A scrape connection (slow client included) is closed after this long.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// A process's metrics registry. Metrics are registered at start-up by each component and then
/// updated without touching the registry (they share their values with it).
pub struct Metrics {
    registry: Mutex<Registry>,
}

impl Metrics {
    /// A registry whose metric names all start with `prefix` (`dfs_mount`, ...).
    pub fn new(prefix: &str) -> Arc<Metrics> {
        Arc::new(Metrics {
            registry: Mutex::new(Registry::with_prefix(prefix)),
        })
    }

    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry.lock().expect("registry").register(name, help, metric);
    }

    /// A counter registered under `name` (exposed as `<prefix>_<name>_total`).
    pub fn counter(&self, name: &str, help: &str) -> Counter {
        let c = Counter::default();
        self.register(name, help, c.clone());
        c
    }

    pub fn gauge(&self, name: &str, help: &str) -> Gauge {
        let g = Gauge::default();
        self.register(name, help, g.clone());
        g
    }

    /// Request metrics of one kind of request, created and registered (see
    /// [`RequestMetrics::register`]).
    pub fn requests(&self, what: &str, help: &str) -> RequestMetrics {
        let m = RequestMetrics::default();
        m.register(self, what, help);
        m
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.lock().expect("registry");
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("writing to a String cannot fail");
        text
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpErrorLabels {
    pub op: &'static str,
    pub kind: String,
}

type DurationFamily = Family<OpLabel, Histogram, fn() -> Histogram>;

/// A histogram of durations in seconds: 10 us up to about 20 s, doubling.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(10e-6, 2.0, 22))
}

/// A histogram of counts or sizes: 1 up to about a million, doubling.
pub fn size_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 21))
}

/// Counts, latencies, errors and requests in flight of one kind of request, per operation.
#[derive(Clone, Debug)]
pub struct RequestMetrics {
    duration: DurationFamily,
    errors: Family<OpErrorLabels, Counter>,
    in_flight: Gauge,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        RequestMetrics {
            duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            errors: Family::default(),
            in_flight: Gauge::default(),
        }
    }
}

impl RequestMetrics {
    /// Registers these as `<prefix>_<what>_duration_seconds`, `<prefix>_<what>_errors_total`
    /// and `<prefix>_<what>_in_flight`; `help` names the requests ("FUSE requests").
    pub fn register(&self, metrics: &Metrics, what: &str, help: &str) {
        metrics.register(
            &format!("{what}_duration_seconds"),
            &format!("Time to answer {help}, by operation"),
            self.duration.clone(),
        );
        metrics.register(
            &format!("{what}_errors"),
            &format!("{help} answered with an error, by operation and kind"),
            self.errors.clone(),
        );
        metrics.register(
            &format!("{what}_in_flight"),
            &format!("{help} being answered now"),
            self.in_flight.clone(),
        );
    }

    /// Counts a request as started; the guard records it as answered when dropped (or through
    /// [`InFlight::done`], with its outcome).
    pub fn start(&self, op: &'static str) -> InFlight {
        self.in_flight.inc();
        InFlight {
            metrics: self.clone(),
            op,
            started: std::time::Instant::now(),
            recorded: false,
        }
    }

    fn record(&self, op: &'static str, elapsed: Duration, error: Option<String>) {
        self.duration
            .get_or_create(&OpLabel { op })
            .observe(elapsed.as_secs_f64());
        if let Some(kind) = error {
            self.errors.get_or_create(&OpErrorLabels { op, kind }).inc();
        }
    }
}

/// One request being answered (see [`RequestMetrics::start`]).
pub struct InFlight {
    metrics: RequestMetrics,
    op: &'static str,
    started: std::time::Instant,
    recorded: bool,
}

impl InFlight {
    /// Records the request as answered, with the kind of error it was answered with, if any.
    pub fn done(mut self, error: Option<String>) {
        self.recorded = true;
        self.metrics.in_flight.dec();
        self.metrics.record(self.op, self.started.elapsed(), error);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.recorded {
            self.metrics.in_flight.dec();
            // Dropped unanswered: the task was cancelled or the peer went away.
            self.metrics
                .record(self.op, self.started.elapsed(), Some("abandoned".into()));
        }
    }
}

/// Binds the metrics address (`host:port`) now, so a mistake in the config stops start-up.
pub async fn bind(addr: &str) -> Result<tokio::net::TcpListener, MetricsError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind {
            addr: addr.to_owned(),
            source,
        })
}

/// Serves `GET /metrics` on `listener` for the life of the process.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, most likely: try again shortly rather than spin.
                tracing::warn!("metrics: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&metrics, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(SCRAPE_DEADLINE, conn).await {
                Ok(Err(e)) => tracing::debug!("metrics: connection from {peer}: {e}"),
                Err(_) => tracing::debug!("metrics: connection from {peer} closed after {SCRAPE_DEADLINE:?}"),
                Ok(Ok(())) => {}
            }
            drop(slot);
        });
    }
}

fn respond(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        (&hyper::Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".to_owned(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET is served\n".to_owned(),
        ),
    };
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

/// Starts serving metrics on `addr` if one is configured; logs where.
pub async fn serve_if_configured(
    addr: Option<&str>,
    metrics: &Arc<Metrics>,
) -> Result<Option<SocketAddr>, MetricsError> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = bind(addr).await?;
    let local = listener.local_addr().map_err(|source| MetricsError::Bind {
        addr: addr.to_owned(),
        source,
    })?;
    tracing::info!("serving metrics on http://{local}/metrics");
    tokio::spawn(serve(listener, metrics.clone()));
    Ok(Some(local))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_per_operation_with_their_errors() {
        let metrics = Metrics::new("dfs_test");
        let requests = metrics.requests("request", "requests");
        requests.start("lookup").done(None);
        requests.start("lookup").done(Some("not_found".into()));
        drop(requests.start("create"));
        let text = metrics.encode();
        assert!(
            text.contains(r#"dfs_test_request_duration_seconds_count{op="lookup"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"dfs_test_request_errors_total{op="lookup",kind="not_found"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"dfs_test_request_errors_total{op="create",kind="abandoned"} 1"#),
            "{text}"
        );
        assert!(text.contains("dfs_test_request_in_flight 0"), "{text}");
    }
}
