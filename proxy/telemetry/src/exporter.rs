//! The OTLP/gRPC span exporter: a bounded queue that the request path fills without
//! ever waiting, and one background task that batches and exports.
//!
//! When the collector is gone or slow, exports fail or time out and their batches are
//! dropped and counted; the queue stays bounded, and when it is full new spans are
//! dropped and counted. The gRPC channel connects lazily and reconnects by itself.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, Counter};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::resource::v1::Resource;
use tokio::sync::{mpsc, watch, Notify};
use tonic::transport::{Channel, Endpoint};

use crate::metrics::{SPANS_DROPPED_TOTAL, SPANS_EXPORTED_TOTAL};
use crate::otlp;
use crate::span::SpanRecord;

/// Environment variable naming the collector's OTLP/gRPC endpoint.
pub const OTLP_ENDPOINT_ENV: &str = "REMORA_OTLP_ENDPOINT";
/// Default collector endpoint (Jaeger's OTLP/gRPC port).
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:4317";
/// Default queue capacity, in spans.
pub const DEFAULT_QUEUE_CAPACITY: usize = 2048;
/// Default largest batch, in spans.
pub const DEFAULT_MAX_BATCH: usize = 512;
/// Default time between exports of a partial batch.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Default time limit of one export, connecting included.
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Exporter settings.
#[derive(Clone, Debug)]
pub struct ExporterConfig {
    /// Collector URL, `http://host:port` ([`OTLP_ENDPOINT_ENV`]).
    pub endpoint: String,
    /// `service.name` of the resource: the workload's mesh service name.
    pub service_name: String,
    /// `service.namespace` (omitted when empty).
    pub namespace: String,
    /// `service.instance.id`, e.g. the pod or process name (omitted when empty).
    pub instance_id: String,
    /// Spans queued at most; more are dropped and counted.
    pub queue_capacity: usize,
    /// Spans per export request at most.
    pub max_batch: usize,
    /// A partial batch is exported after this long.
    pub interval: Duration,
    /// Time limit of one export; a batch that exceeds it is dropped and counted.
    pub export_timeout: Duration,
}

impl Default for ExporterConfig {
    fn default() -> Self {
        ExporterConfig {
            endpoint: DEFAULT_ENDPOINT.to_owned(),
            service_name: String::new(),
            namespace: String::new(),
            instance_id: String::new(),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            max_batch: DEFAULT_MAX_BATCH,
            interval: DEFAULT_INTERVAL,
            export_timeout: DEFAULT_EXPORT_TIMEOUT,
        }
    }
}

/// Why the exporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    /// The endpoint is not a valid URI.
    #[error("invalid OTLP endpoint {endpoint:?}: {source}")]
    Endpoint {
        /// The endpoint given.
        endpoint: String,
        /// What was wrong with it.
        source: tonic::transport::Error,
    },
    /// Not called from within a Tokio runtime.
    #[error("the OTLP exporter must be started within a Tokio runtime")]
    NoRuntime,
}

/// Starts exporters.
pub struct Exporter;

impl Exporter {
    /// Starts the background export task on the current Tokio runtime and returns the
    /// handle to submit spans with. No connection is made until the first export.
    /// Create it after [`crate::Metrics::install`] so its counters are exported.
    pub fn start(config: ExporterConfig) -> Result<ExporterHandle, ExporterError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| ExporterError::NoRuntime)?;
        let channel = Endpoint::from_shared(config.endpoint.clone())
            .map_err(|source| ExporterError::Endpoint {
                endpoint: config.endpoint.clone(),
                source,
            })?
            .connect_timeout(config.export_timeout)
            .timeout(config.export_timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let (done_tx, done_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            dropped: AtomicU64::new(0),
            exported: AtomicU64::new(0),
            dropped_queue_full: counter!(SPANS_DROPPED_TOTAL, "reason" => "queue_full"),
            dropped_export_failed: counter!(SPANS_DROPPED_TOTAL, "reason" => "export_failed"),
            exported_total: counter!(SPANS_EXPORTED_TOTAL),
            shutdown: Notify::new(),
            failing: AtomicBool::new(false),
        });
        let task = Task {
            rx,
            client: TraceServiceClient::new(channel),
            resource: otlp::resource(&config.service_name, &config.namespace, &config.instance_id),
            max_batch: config.max_batch.max(1),
            interval: config.interval,
            export_timeout: config.export_timeout,
            shared: shared.clone(),
        };
        runtime.spawn(async move {
            task.run().await;
            let _ = done_tx.send(true);
        });
        Ok(ExporterHandle {
            tx,
            shared,
            done: done_rx,
        })
    }
}

/// Submits finished spans. Cheap to clone; the export task ends when
/// [`ExporterHandle::shutdown`] is called or every handle is dropped, after a last
/// export of what is queued.
#[derive(Clone)]
pub struct ExporterHandle {
    tx: mpsc::Sender<SpanRecord>,
    shared: Arc<Shared>,
    done: watch::Receiver<bool>,
}

struct Shared {
    dropped: AtomicU64,
    exported: AtomicU64,
    dropped_queue_full: Counter,
    dropped_export_failed: Counter,
    exported_total: Counter,
    shutdown: Notify,
    /// Whether the last export failed: log on changes only.
    failing: AtomicBool,
}

impl ExporterHandle {
    /// Queues a finished span for export. Never waits: when the queue is full (or the
    /// exporter has stopped) the span is dropped and counted.
    pub fn submit(&self, span: SpanRecord) {
        if self.tx.try_send(span).is_err() {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            self.shared.dropped_queue_full.increment(1);
        }
    }

    /// Spans dropped so far (queue full, export failed or timed out, rejected).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Spans the collector accepted so far.
    pub fn exported(&self) -> u64 {
        self.shared.exported.load(Ordering::Relaxed)
    }

    /// Stops taking spans, exports what is queued and ends the task, waiting at most
    /// `grace`. Returns whether the task ended in time.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.shared.shutdown.notify_one();
        let mut done = self.done.clone();
        tokio::time::timeout(grace, done.wait_for(|d| *d))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

struct Task {
    rx: mpsc::Receiver<SpanRecord>,
    client: TraceServiceClient<Channel>,
    resource: Resource,
    max_batch: usize,
    interval: Duration,
    export_timeout: Duration,
    shared: Arc<Shared>,
}

impl Task {
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate
        loop {
            // Invariant: batch.len() < max_batch here, so recv_many has room.
            let room = self.max_batch - batch.len();
            tokio::select! {
                biased;
                () = self.shared.shutdown.notified() => break,
                received = self.rx.recv_many(&mut batch, room) => {
                    if received == 0 {
                        break; // every handle dropped
                    }
                    if batch.len() >= self.max_batch {
                        self.export(&mut batch).await;
                        tick.reset();
                    }
                }
                _ = tick.tick() => {
                    if !batch.is_empty() {
                        self.export(&mut batch).await;
                    }
                }
            }
        }
        // Drain: refuse new spans, export what is queued.
        self.rx.close();
        loop {
            let room = self.max_batch - batch.len();
            let received = self.rx.recv_many(&mut batch, room).await;
            if batch.is_empty() {
                break;
            }
            if received == 0 || batch.len() >= self.max_batch {
                self.export(&mut batch).await;
            }
        }
    }

    async fn export(&mut self, batch: &mut Vec<SpanRecord>) {
        let count = batch.len() as u64;
        let spans = batch.drain(..).map(otlp::span).collect();
        let request = otlp::request(&self.resource, spans);
        let outcome = tokio::time::timeout(self.export_timeout, self.client.export(request)).await;
        let (exported, error) = match outcome {
            Ok(Ok(response)) => {
                let rejected = response
                    .into_inner()
                    .partial_success
                    .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0))
                    .min(count);
                (count - rejected, None)
            }
            Ok(Err(status)) => (0, Some(status.to_string())),
            Err(_) => (
                0,
                Some(format!("timed out after {:?}", self.export_timeout)),
            ),
        };
        let dropped = count - exported;
        let shared = &self.shared;
        shared.exported.fetch_add(exported, Ordering::Relaxed);
        shared.exported_total.increment(exported);
        shared.dropped.fetch_add(dropped, Ordering::Relaxed);
        shared.dropped_export_failed.increment(dropped);
        match error {
            Some(error) => {
                if !shared.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, spans = count, "OTLP export failed; dropping spans until the collector answers");
                }
            }
            None => {
                if shared.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("OTLP export recovered");
                }
            }
        }
    }
}
