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
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use kache_oci::credentials::DockerConfig;
use kache_proxy::{Proxy, ProxyConfig, ProxyMetrics};
use kache_registry::{Access, Metrics, Registry};
use kache_store::Store;
use kache_upstream::{Upstream, UpstreamConfig};
use prometheus_client::registry::Registry as PromRegistry;
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::UpstreamArgs;

#[derive(Debug)]
pub struct RegistryOptions {
    pub listen: SocketAddr,
    pub internal_listen: Option<SocketAddr>,
    pub write_token: Option<String>,
    /// Writes allowed on `listen` without a token (`kache dev` only).
    pub open_writes: bool,
    pub metrics_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub upload_timeout: Duration,
    pub tag_ttl: Duration,
    pub server: HttpServer,
    pub gc: kache_registry::GcConfig,
    pub upstream: UpstreamConfig,
    /// A node proxy in the same process (`kache dev`).
    pub proxy: Option<ProxyOptions>,
}

/// Which HTTP server answers the clients of the registry and of the proxy (`--http-server`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HttpServer {
    /// kache's own HTTP/1.1 server (crates/http): blob bodies never cross user space, the
    /// registry's go page cache → socket with sendfile(2), the proxy's registry socket → pipe →
    /// client socket with splice(2). A connection that sends a request body (a push), or speaks
    /// HTTP/2, is handed to hyper. (`splice` is the proxy's old name for it.)
    #[value(alias = "splice")]
    Kache,
    /// hyper for everything; every body byte is copied through user space.
    Hyper,
}

#[derive(Debug)]
pub struct ProxyOptions {
    pub listen: Vec<SocketAddr>,
    pub registry: kache_proxy::RegistryUrl,
    pub registry_timeout: Duration,
    pub metrics_listen: SocketAddr,
    pub upstream: UpstreamConfig,
    pub server: HttpServer,
}

#[derive(Debug)]
pub struct WebhookOptions {
    pub listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub proxy_port: u16,
    pub ignore_registries: Vec<String>,
    pub accept: Vec<String>,
    pub skip_mutable: bool,
    pub metrics_listen: SocketAddr,
    pub shutdown_delay: Duration,
}

/// The upstream client's configuration from flags.
pub fn upstream_config(a: &UpstreamArgs) -> anyhow::Result<UpstreamConfig> {
    let credentials = match &a.docker_config {
        Some(p) => DockerConfig::from_file(p)
            .with_context(|| format!("reading credentials from {}", p.display()))?,
        None => DockerConfig::default(),
    };
    let extra_ca_pem = a
        .ca_files
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading CA file {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(UpstreamConfig {
        credentials,
        extra_ca_pem,
        insecure_registries: a.insecure_registries.clone(),
        request_timeout: a.upstream_timeout,
        ..UpstreamConfig::default()
    })
}

/// Reads a bearer token from a mounted Secret; surrounding whitespace is not part of it.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("reading the write token from {}", path.display()))?;
    let t = t.trim().to_owned();
    anyhow::ensure!(
        t.len() >= 16,
        "the write token in {} is shorter than 16 characters",
        path.display()
    );
    Ok(t)
}

/// Resolves when the process is asked to stop (SIGTERM from the kubelet, or Ctrl-C).
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return ctrl_c.await.unwrap_or(()),
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
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

/// Resolves `delay` after the process is asked to stop: a server behind a Service keeps
/// answering while its endpoint is withdrawn, so that no caller meets a closed port.
async fn shutdown_after(delay: Duration) {
    shutdown_signal().await;
    if !delay.is_zero() {
        tracing::info!(?delay, "serving on until endpoints are withdrawn");
        tokio::time::sleep(delay).await;
    }
}

/// Serves `app` on `listener` until shutdown.
fn spawn_server(
    set: &mut JoinSet<anyhow::Result<()>>,
    listener: tokio::net::TcpListener,
    app: Router,
    what: &'static str,
) {
    set.spawn(async move {
        serve(listener, app, shutdown_signal())
            .await
            .with_context(|| format!("{what} failed"))
    });
}

/// What `axum::serve(..).with_graceful_shutdown(..)` does (HTTP/1.1 and h2c, upgrades; on
/// shutdown stop accepting, let open connections finish), with hyper's buffers capped.
async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(kache_http::MAX_BUF);
    builder.http2().enable_connect_protocol();
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            a = kache_oci::net::accept(&listener) => a,
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |req| app.clone().oneshot(req));
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(tcp), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Serves the registry's `app` on `listener` until shutdown, with the server asked for.
fn spawn_registry(
    set: &mut JoinSet<anyhow::Result<()>>,
    listener: tokio::net::TcpListener,
    app: Router,
    server: HttpServer,
    what: &'static str,
) {
    match server {
        HttpServer::Hyper => spawn_server(set, listener, app, what),
        HttpServer::Kache => {
            set.spawn(async move {
                kache_registry::serve(app, listener, shutdown_signal())
                    .await
                    .with_context(|| format!("{what} failed"))
            });
        }
    }
}

/// Serves the proxy on `listener` until shutdown, with the HTTP server asked for.
fn spawn_proxy(
    set: &mut JoinSet<anyhow::Result<()>>,
    listener: tokio::net::TcpListener,
    proxy: &Proxy,
    server: HttpServer,
) {
    match server {
        HttpServer::Hyper => spawn_server(set, listener, proxy.router(), "proxy"),
        HttpServer::Kache => {
            let proxy = proxy.clone();
            set.spawn(async move {
                proxy
                    .serve(listener, shutdown_signal())
                    .await
                    .context("proxy failed")
            });
        }
    }
}

/// Binds with SO_REUSEPORT: during a DaemonSet's surge update the new proxy binds the node's
/// port beside the old one, which then stops accepting and finishes its pulls, so the kubelet
/// always finds a proxy.
fn bind_shared(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Binds the proxy's listeners (shared with a proxy that replaces this one); an IPv6 address
/// the host lacks is skipped, not fatal.
async fn bind_proxy(addrs: &[SocketAddr]) -> anyhow::Result<Vec<tokio::net::TcpListener>> {
    let mut out = Vec::new();
    for &a in addrs {
        match bind_shared(a) {
            Ok(l) => out.push(l),
            Err(e) if a.is_ipv6() && matches!(e.raw_os_error(), Some(99 | 97)) => {
                tracing::info!(addr = %a, "no IPv6 on this host; not listening there");
            }
            Err(e) => return Err(e).with_context(|| format!("cannot listen on {a} for the proxy")),
        }
    }
    anyhow::ensure!(!out.is_empty(), "the proxy has no address to listen on");
    Ok(out)
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
    let upstream = Upstream::new(o.upstream.clone()).context("configuring the upstream client")?;
    let registry = Registry::with_pull_through(store.clone(), metrics.clone(), upstream, o.tag_ttl);
    tracing::info!(schedule = %o.gc.schedule, grace = ?o.gc.grace, max_size = ?o.gc.limits.max_size, min_free = ?o.gc.limits.min_free, "garbage collection");
    registry.configure_gc(o.gc);

    let access = match (&o.write_token, o.open_writes) {
        (_, true) => Access::ReadWrite,
        (Some(t), false) => Access::Token(t.as_str().into()),
        (None, false) => Access::ReadOnly,
    };
    if matches!(access, Access::ReadOnly) && o.internal_listen.is_none() {
        tracing::warn!(
            "no --internal-listen and no --write-token-file: nothing can push to or warm this registry"
        );
    }
    let mut servers = JoinSet::new();
    spawn_registry(
        &mut servers,
        bind(o.listen, "the registry").await?,
        registry.router_for(access),
        o.server,
        "registry",
    );
    if let Some(addr) = o.internal_listen {
        spawn_registry(
            &mut servers,
            bind(addr, "the internal registry listener").await?,
            registry.router_for(Access::ReadWrite),
            o.server,
            "internal registry listener",
        );
    }
    if let Some(p) = o.proxy {
        let proxy = Proxy::new(
            ProxyConfig {
                registry: p.registry,
                registry_timeout: p.registry_timeout,
            },
            Upstream::new(p.upstream).context("configuring the proxy's upstream client")?,
            ProxyMetrics::new(&mut prom),
        );
        for l in bind_proxy(&p.listen).await? {
            spawn_proxy(&mut servers, l, &proxy, p.server);
        }
        tracing::info!(listen = ?p.listen, server = ?p.server, "proxy serving");
    }
    let ops = bind(o.metrics_listen, "metrics").await?;
    tracing::info!(listen = %o.listen, internal = ?o.internal_listen, metrics = %o.metrics_listen, data_dir = %o.data_dir.display(), "registry serving");

    let gauges = registry.clone();
    let ops_app = ops_router(Arc::new(prom), move || gauges.refresh_gauges());
    spawn_server(&mut servers, ops, ops_app, "metrics listener");
    let maintain = tokio::spawn(registry.clone().maintain(o.upload_timeout));
    // The first server to end (shutdown or failure) ends the process.
    let first = servers.join_next().await;
    maintain.abort();
    store
        .flush_access()
        .await
        .context("flushing access times")?;
    match first {
        Some(r) => r?,
        None => Ok(()),
    }
}

pub async fn proxy(o: ProxyOptions) -> anyhow::Result<()> {
    let mut prom = PromRegistry::default();
    let proxy = Proxy::new(
        ProxyConfig {
            registry: o.registry.clone(),
            registry_timeout: o.registry_timeout,
        },
        Upstream::new(o.upstream).context("configuring the upstream client")?,
        ProxyMetrics::new(&mut prom),
    );
    let mut servers = JoinSet::new();
    for l in bind_proxy(&o.listen).await? {
        spawn_proxy(&mut servers, l, &proxy, o.server);
    }
    spawn_server(
        &mut servers,
        bind_shared(o.metrics_listen)
            .with_context(|| format!("cannot listen on {} for metrics", o.metrics_listen))?,
        ops_router(Arc::new(prom), || {}),
        "metrics listener",
    );
    tracing::info!(listen = ?o.listen, registry = %o.registry, server = ?o.server, metrics = %o.metrics_listen, "proxy serving");
    match servers.join_next().await {
        Some(r) => r?,
        None => Ok(()),
    }
}

pub async fn webhook(o: WebhookOptions) -> anyhow::Result<()> {
    let policy = kache_webhook::Policy {
        proxy_port: o.proxy_port,
        ignore_registries: o
            .ignore_registries
            .iter()
            .map(|p| kache_webhook::Pattern::registry(p))
            .collect::<Result<_, _>>()
            .context("--ignore-registry")?,
        accept: o
            .accept
            .iter()
            .map(|p| kache_webhook::Pattern::image(p))
            .collect::<Result<_, _>>()
            .context("--accept")?,
        skip_mutable: o.skip_mutable,
    };
    let certs = kache_webhook::ReloadingCert::load(&o.tls_cert, &o.tls_key)
        .context("loading the serving certificate")?;
    let tls = kache_webhook::server_config(certs.clone())?;
    let mut prom = PromRegistry::default();
    let hook = kache_webhook::Webhook::new(policy, kache_webhook::WebhookMetrics::new(&mut prom));
    let mut servers = JoinSet::new();
    let listener = bind(o.listen, "the webhook").await?;
    let delay = o.shutdown_delay;
    servers.spawn(async move {
        kache_webhook::serve_tls(listener, tls, hook.router(), shutdown_after(delay))
            .await
            .context("webhook failed")
    });
    let ops = bind(o.metrics_listen, "metrics").await?;
    let ops_app = ops_router(Arc::new(prom), || {});
    servers.spawn(async move {
        serve(ops, ops_app, shutdown_after(delay))
            .await
            .context("metrics listener failed")
    });
    let watch = tokio::spawn(certs.watch(Duration::from_secs(1)));
    tracing::info!(listen = %o.listen, metrics = %o.metrics_listen, cert = %o.tls_cert.display(), "webhook serving");
    let first = servers.join_next().await;
    watch.abort();
    match first {
        Some(r) => r?,
        None => Ok(()),
    }
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

/// Serves `/metrics`, `/healthz` and `/readyz` in the background (the controller's only
/// listener).
pub async fn spawn_ops(
    addr: SocketAddr,
    prom: Arc<PromRegistry>,
    before_scrape: impl Fn() + Clone + Send + Sync + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let listener = bind(addr, "metrics").await?;
    let app = ops_router(prom, before_scrape);
    Ok(tokio::spawn(async move {
        serve(listener, app, shutdown_signal())
            .await
            .context("metrics listener failed")
    }))
}
