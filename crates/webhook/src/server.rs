//! The admission endpoint: `POST /mutate`, with metrics. `kache_http::serve_tls` serves it.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::review::review;
use crate::rules::Policy;

/// Largest AdmissionReview accepted; the API server caps objects at 3 MiB (etcd's limit) plus
/// the review's envelope.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The webhook's metric handles (`kache_webhook_*`). Cloning shares them.
#[derive(Clone, Debug)]
pub struct WebhookMetrics {
    reviews: Counter,
    patched: Counter,
    skipped: Family<ReasonLabel, Counter>,
    duration: Histogram,
}

impl WebhookMetrics {
    /// Registers the metrics in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = WebhookMetrics {
            reviews: Counter::default(),
            patched: Counter::default(),
            skipped: Family::default(),
            // 50 µs .. ~0.8 s
            duration: Histogram::new(exponential_buckets(0.00005, 2.0, 15)),
        };
        let r = registry.sub_registry_with_prefix("kache_webhook");
        r.register(
            "reviews",
            "AdmissionReviews answered (bodies that were not one are not counted)",
            m.reviews.clone(),
        );
        r.register(
            "patched",
            "AdmissionReviews answered with a patch",
            m.patched.clone(),
        );
        r.register(
            "skipped",
            "Images left as they were (or whole reviews: not_pod, operation, unparsable_object, invalid_patch, pod_opt_out, pod_ignored_namespace, pod_not_selected), by reason",
            m.skipped.clone(),
        );
        r.register(
            "review_duration_seconds",
            "Time to answer one AdmissionReview, from the body read to the answer",
            m.duration.clone(),
        );
        m
    }

    fn skip(&self, reason: &'static str) {
        self.skipped.get_or_create(&ReasonLabel { reason }).inc();
    }
}

#[derive(Debug)]
struct Inner {
    policy: Policy,
    metrics: WebhookMetrics,
}

/// The `/mutate` endpoint over a policy.
#[derive(Clone, Debug)]
pub struct Webhook(Arc<Inner>);

impl Webhook {
    pub fn new(policy: Policy, metrics: WebhookMetrics) -> Self {
        Webhook(Arc::new(Inner { policy, metrics }))
    }

    /// The webhook role: serves `/mutate` over TLS on `listener` with the certificate in
    /// `cert`, re-reading its files every second (a renewed pair serves new connections without
    /// a restart), until `shutdown`.
    pub async fn run(
        self,
        listener: tokio::net::TcpListener,
        cert: std::sync::Arc<crate::ReloadingCert>,
        shutdown: kache_http::Shutdown,
    ) -> std::io::Result<()> {
        let tls = crate::server_config(cert.clone()).map_err(std::io::Error::other)?;
        let watch = tokio::spawn(cert.watch(std::time::Duration::from_secs(1)));
        let end = kache_http::serve_tls(listener, tls, self.router(), shutdown.wait()).await;
        watch.abort();
        end
    }

    /// `POST /mutate`, bodies up to [`MAX_BODY`] (larger ones get 413).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/mutate", post(mutate))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(self.clone())
    }
}

async fn mutate(State(hook): State<Webhook>, body: Bytes) -> Response {
    let start = Instant::now();
    let m = &hook.0.metrics;
    let reviewed = match review(&body, &hook.0.policy) {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(error = %e, "refused a request to /mutate");
            return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
        }
    };
    m.reviews.inc();
    if reviewed.rewritten > 0 {
        m.patched.inc();
    }
    for s in &reviewed.skipped {
        m.skip(s.reason.as_str());
    }
    if let Some(skip) = reviewed.pod_skipped {
        m.skip(skip.as_str());
    }
    match &reviewed.unhandled {
        Some((reason, why)) => {
            m.skip(reason.as_str());
            tracing::info!(uid = %reviewed.uid, reason = reason.as_str(), %why, "allowed without a patch");
        }
        None => tracing::debug!(
            uid = %reviewed.uid,
            rewritten = reviewed.rewritten,
            skipped = ?reviewed.skipped,
            "reviewed"
        ),
    }
    m.duration.observe(start.elapsed().as_secs_f64());
    ([(header::CONTENT_TYPE, "application/json")], reviewed.body).into_response()
}
