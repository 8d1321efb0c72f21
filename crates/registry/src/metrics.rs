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
        m
    }
}
