//! The operations endpoints every kache process serves on a listener of their own.

use std::sync::Arc;

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::get;
use http::{StatusCode, header};
use prometheus_client::registry::Registry;

/// `/metrics` (OpenMetrics text), `/healthz` and `/readyz`. `before_scrape` runs before each
/// scrape, to bring gauges that are costly to keep current up to date.
pub fn ops_router(
    prom: Arc<Registry>,
    before_scrape: impl Fn() + Clone + Send + Sync + 'static,
) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let prom = prom.clone();
                let before_scrape = before_scrape.clone();
                async move {
                    before_scrape();
                    let mut out = String::new();
                    match prometheus_client::encoding::text::encode(&mut out, &prom) {
                        Ok(()) => (
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            out,
                        )
                            .into_response(),
                        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::body::Body;
    use http::Request;
    use http_body_util::BodyExt;
    use prometheus_client::metrics::gauge::Gauge;
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn a_scrape_brings_gauges_up_to_date_first() {
        let mut prom = Registry::default();
        let gauge = Gauge::<i64>::default();
        prom.register("answer", "what before_scrape set", gauge.clone());
        let scrapes = Arc::new(AtomicUsize::new(0));
        let counted = scrapes.clone();
        let app = ops_router(Arc::new(prom), move || {
            counted.fetch_add(1, Ordering::Relaxed);
            gauge.set(42);
        });
        let resp = app
            .clone()
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(
            resp.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        let text = std::str::from_utf8(&text).unwrap();
        assert!(text.contains("answer 42"), "{text}");
        assert_eq!(scrapes.load(Ordering::Relaxed), 1);

        for path in ["/healthz", "/readyz"] {
            let resp = app
                .clone()
                .oneshot(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
        }
        assert_eq!(scrapes.load(Ordering::Relaxed), 1, "only /metrics scrapes");
    }
}
