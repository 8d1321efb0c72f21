//! Prometheus metrics of the registry (`kache_registry_*`), served on their own listener.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `manifest` or `blob`.
    pub kind: &'static str,
    /// `hit`, `miss` or `stale`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `success`, `failure` or `dry_run` (collections); an auth result (reads of private
    /// repositories).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: &'static str,
}

/// The registry's metric handles. Cloning shares them.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RouteLabel, Histogram>,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub store_bytes: Gauge,
    pub cache: Family<CacheLabels, Counter>,
    pub upstream_errors: Counter,
    pub blobs_not_stored: Counter,
    pub store_free_bytes: Gauge,
    pub gc_runs: Family<ResultLabel, Counter>,
    pub gc_duration: Histogram,
    pub gc_freed_bytes: Counter,
    pub gc_freed_blobs: Counter,
    pub gc_evicted_images: Counter,
    pub gc_last_success: Gauge,
    /// Reads of private repositories, by [`crate::tenancy::AuthResult`].
    pub auth: Family<ResultLabel, Counter>,
    /// Grants that hold now.
    pub grants: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them under `kache_registry_`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.5, 12))
            }),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            store_bytes: Gauge::default(),
            cache: Family::default(),
            upstream_errors: Counter::default(),
            blobs_not_stored: Counter::default(),
            store_free_bytes: Gauge::default(),
            gc_runs: Family::default(),
            gc_duration: Histogram::new(exponential_buckets(0.01, 4.0, 10)),
            gc_freed_bytes: Counter::default(),
            gc_freed_blobs: Counter::default(),
            gc_evicted_images: Counter::default(),
            gc_last_success: Gauge::default(),
            auth: Family::default(),
            grants: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("kache_registry");
        r.register(
            "requests",
            "Requests by route, method and status",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time to the response head, by route",
            m.duration.clone(),
        );
        r.register(
            "received_bytes",
            "Bytes received in uploads and manifests",
            m.bytes_in.clone(),
        );
        r.register(
            "sent_bytes",
            "Bytes of blobs and manifests sent",
            m.bytes_out.clone(),
        );
        r.register(
            "store_bytes",
            "Bytes held in the store",
            m.store_bytes.clone(),
        );
        r.register(
            "cache_requests",
            "Pull-through lookups by kind and outcome (stale: served from cache because the upstream could not re-validate)",
            m.cache.clone(),
        );
        r.register(
            "upstream_errors",
            "Upstream fetches that failed",
            m.upstream_errors.clone(),
        );
        r.register(
            "blobs_not_stored",
            "Fetched blobs served to their clients but not kept (disk full or I/O error)",
            m.blobs_not_stored.clone(),
        );
        r.register(
            "store_free_bytes",
            "Bytes free on the data directory's filesystem",
            m.store_free_bytes.clone(),
        );
        r.register(
            "gc_runs",
            "Garbage collections by result (success, failure, dry_run)",
            m.gc_runs.clone(),
        );
        r.register(
            "gc_duration_seconds",
            "Time a garbage collection took",
            m.gc_duration.clone(),
        );
        r.register(
            "gc_freed_bytes",
            "Bytes of blobs and manifests garbage collection removed",
            m.gc_freed_bytes.clone(),
        );
        r.register(
            "gc_freed_blobs",
            "Blobs and manifests garbage collection removed",
            m.gc_freed_blobs.clone(),
        );
        r.register(
            "gc_evicted_images",
            "Images evicted to keep the store under --max-size and the disk over --min-free",
            m.gc_evicted_images.clone(),
        );
        r.register(
            "gc_last_success_timestamp_seconds",
            "When the last successful garbage collection started (unix seconds)",
            m.gc_last_success.clone(),
        );
        r.register(
            "auth",
            "Reads of private repositories by result (granted, anonymous, invalid_token, no_grant, expired)",
            m.auth.clone(),
        );
        r.register(
            "grants",
            "Grants of private repositories to namespaces that hold now (unexpired)",
            m.grants.clone(),
        );
        m
    }
}
