//! Prometheus metrics of the node proxy (`kache_proxy_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The upstream registry the repository names (`none` for plain repositories).
    pub upstream: String,
    /// `hit`, `miss`, `stale` (from the registry), `registry` (a plain registry answer),
    /// `fallback` (served straight from upstream) or `error`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: String,
}

/// The proxy's metric handles. Cloning shares them.
#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub bytes: Counter,
    /// The part of `bytes` that went from the registry's socket to the client's with
    /// splice(2), never through user space.
    pub spliced: Counter,
    pub upstream_errors: Family<UpstreamLabel, Counter>,
}

impl ProxyMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = ProxyMetrics {
            requests: Family::default(),
            bytes: Counter::default(),
            spliced: Counter::default(),
            upstream_errors: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("kache_proxy");
        r.register(
            "requests",
            "Pulls by upstream registry and how they were served",
            m.requests.clone(),
        );
        r.register("sent_bytes", "Bytes sent to clients", m.bytes.clone());
        r.register(
            "spliced_bytes",
            "Blob bytes sent to clients with splice(2), without a copy through the proxy",
            m.spliced.clone(),
        );
        r.register(
            "upstream_errors",
            "Fallback fetches the upstream failed",
            m.upstream_errors.clone(),
        );
        m
    }

    pub(crate) fn count(&self, upstream: &str, result: &'static str) {
        self.requests
            .get_or_create(&RequestLabels {
                upstream: upstream.to_owned(),
                result,
            })
            .inc();
    }

    pub(crate) fn upstream_error(&self, upstream: &str) {
        self.upstream_errors
            .get_or_create(&UpstreamLabel {
                upstream: upstream.to_owned(),
            })
            .inc();
    }
}
