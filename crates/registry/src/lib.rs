//! The OCI Distribution API (v1.1) served by axum over the kache store.
//!
//! Every request is routed by [`route::Route::parse`] from its raw path, then handled in
//! [`api`]; every failure is an [`error::Error`] with the spec's code and JSON body.

mod api;
pub mod error;
pub mod metrics;
pub mod route;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use kache_store::Store;

pub use metrics::Metrics;

/// The registry service: a store and its metrics, cheap to clone into handlers.
#[derive(Clone, Debug)]
pub struct Registry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<Store>,
    metrics: Metrics,
}

impl Registry {
    pub fn new(store: Arc<Store>, metrics: Metrics) -> Self {
        Registry {
            inner: Arc::new(Inner { store, metrics }),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    /// The `/v2/` API as an axum router.
    pub fn router(&self) -> Router {
        Router::new().fallback(handle).with_state(self.clone())
    }

    /// Background upkeep: flushes access times, expires abandoned uploads, refreshes the
    /// store-size gauge. Runs until the task is dropped.
    pub async fn maintain(self, upload_timeout: Duration) {
        let mut tick = tokio::time::interval(Duration::from_secs(15));
        loop {
            tick.tick().await;
            let store = &self.inner.store;
            if let Err(e) = store.flush_access().await {
                tracing::warn!(error = %e, "flushing access times failed");
            }
            match store.expire_uploads(upload_timeout).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(expired = n, "removed abandoned uploads"),
                Err(e) => tracing::warn!(error = %e, "expiring uploads failed"),
            }
            self.inner
                .metrics
                .store_bytes
                .set(store.total_bytes() as i64);
        }
    }
}

async fn handle(State(reg): State<Registry>, req: Request) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let (route, mut resp) = match route::Route::parse(&path) {
        Ok(route) => {
            let label = route.label();
            (
                label,
                reg.dispatch(route, req)
                    .await
                    .unwrap_or_else(IntoResponse::into_response),
            )
        }
        Err(e) => ("invalid", e.into_response()),
    };
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    let status = resp.status().as_u16();
    let m = &reg.inner.metrics;
    m.requests
        .get_or_create(&metrics::RequestLabels {
            route,
            method: method_label(&method),
            status,
        })
        .inc();
    m.duration
        .get_or_create(&metrics::RouteLabel { route })
        .observe(started.elapsed().as_secs_f64());
    tracing::debug!(%method, %path, status, elapsed_ms = started.elapsed().as_millis() as u64, "request");
    resp
}

/// Methods as metric labels; anything unusual is one label, so clients cannot grow the series.
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "other",
    }
}
