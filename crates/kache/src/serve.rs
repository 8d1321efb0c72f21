//! Wiring: listeners, the metrics endpoint, graceful shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use kache_registry::{Metrics, Registry};
use kache_store::Store;
use prometheus_client::registry::Registry as PromRegistry;

#[derive(Debug)]
pub struct RegistryOptions {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub upload_timeout: Duration,
}

/// Resolves when the process is asked to stop (SIGTERM from the kubelet, or Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
    tracing::info!("shutting down");
}

/// `/metrics`, `/healthz` and `/readyz` on their own listener.
fn ops_router(
    prom: Arc<PromRegistry>,
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

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for {what}"))
}

pub async fn registry(o: RegistryOptions) -> anyhow::Result<()> {
    let data_dir = o.data_dir.clone();
    let (store, recovery) = tokio::task::spawn_blocking(move || Store::open(&data_dir))
        .await?
        .with_context(|| format!("cannot open the store in {}", o.data_dir.display()))?;
    tracing::debug!(?recovery, "store opened");
    let store = Arc::new(store);
    let mut prom = PromRegistry::default();
    let metrics = Metrics::new(&mut prom);
    let registry = Registry::new(store.clone(), metrics.clone());

    let api = bind(o.listen, "the registry").await?;
    let ops = bind(o.metrics_listen, "metrics").await?;
    tracing::info!(listen = %o.listen, metrics = %o.metrics_listen, data_dir = %o.data_dir.display(), "registry serving");

    let gauge_store = store.clone();
    let ops_app = ops_router(Arc::new(prom), move || {
        metrics.store_bytes.set(gauge_store.total_bytes() as i64);
    });
    let maintain = tokio::spawn(registry.clone().maintain(o.upload_timeout));
    let ops_task = tokio::spawn(async move { axum::serve(ops, ops_app).await });
    axum::serve(api, registry.router())
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("registry server failed")?;
    maintain.abort();
    ops_task.abort();
    store
        .flush_access()
        .await
        .context("flushing access times")?;
    Ok(())
}

pub async fn fsck(data_dir: &Path) -> anyhow::Result<()> {
    let dir = data_dir.to_owned();
    let (store, recovery) = tokio::task::spawn_blocking(move || Store::open(&dir))
        .await?
        .with_context(|| {
            format!(
                "cannot open the store in {} (is a registry still running on it?)",
                data_dir.display()
            )
        })?;
    println!("recovery: {recovery:?}");
    let report = store.verify().await?;
    println!(
        "blobs: {}  bytes: {}  bad: {}",
        report.blobs,
        report.bytes,
        report.bad.len()
    );
    for b in &report.bad {
        println!("BAD {b}");
    }
    if report.bad.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{} blobs do not verify", report.bad.len())
    }
}
