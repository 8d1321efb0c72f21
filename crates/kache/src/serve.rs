//! Wiring: each role's listeners, its metrics endpoint, and the order it stops in.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kache_http::{ServerKind, ops_router, shutdown};
use kache_oci::credentials::DockerConfig;
use kache_proxy::{Proxy, ProxyConfig, ProxyMetrics};
use kache_registry::{Access, Metrics, Registry};
use kache_store::{Store, VerifyProgress};
use kache_upstream::{Upstream, UpstreamConfig};
use prometheus_client::registry::Registry as PromRegistry;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

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
    pub server: ServerKind,
    pub gc: kache_registry::GcConfig,
    pub upstream: UpstreamConfig,
}

#[derive(Debug)]
pub struct ProxyOptions {
    pub listen: Vec<SocketAddr>,
    pub registry: kache_proxy::RegistryUrl,
    pub registry_timeout: Duration,
    pub metrics_listen: SocketAddr,
    pub upstream: UpstreamConfig,
    pub server: ServerKind,
}

#[derive(Debug)]
pub struct WebhookOptions {
    pub listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub policy: kache_webhook::Policy,
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

/// The servers of one process: the first to end (shutdown, or a failure) ends the process.
#[derive(Default)]
struct Servers(JoinSet<anyhow::Result<()>>);

impl Servers {
    /// Runs `serving` (one listener's server) until the process stops.
    fn spawn(
        &mut self,
        what: &'static str,
        serving: impl Future<Output = std::io::Result<()>> + Send + 'static,
    ) {
        self.0
            .spawn(async move { serving.await.with_context(|| format!("{what} failed")) });
    }

    /// `/metrics`, `/healthz` and `/readyz` on `listener`.
    fn spawn_ops(
        &mut self,
        listener: TcpListener,
        prom: PromRegistry,
        before_scrape: impl Fn() + Clone + Send + Sync + 'static,
    ) {
        let app = ops_router(Arc::new(prom), before_scrape);
        self.spawn(
            "metrics listener",
            kache_http::serve_hyper(listener, app, shutdown::signal()),
        );
    }

    /// Waits for the first server to end, and answers how it ended.
    async fn first_end(mut self) -> anyhow::Result<()> {
        match self.0.join_next().await {
            Some(r) => r?,
            None => Ok(()),
        }
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for {what}"))
}

/// Binds the proxy's listeners, shared with a proxy that replaces this one (see
/// [`kache_http::net::bind_shared`]); an IPv6 address the host lacks is skipped, not fatal.
fn bind_proxy(addrs: &[SocketAddr]) -> anyhow::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for &a in addrs {
        match kache_http::net::bind_shared(a) {
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

/// The registry role: opens its store, and serves the API on its listeners.
async fn start_registry(
    o: &RegistryOptions,
    servers: &mut Servers,
    prom: &mut PromRegistry,
) -> anyhow::Result<Registry> {
    let upstream = Upstream::new(o.upstream.clone()).context("configuring the upstream client")?;
    let (registry, recovery) =
        Registry::open(&o.data_dir, Metrics::new(prom), Some((upstream, o.tag_ttl)))
            .await
            .with_context(|| format!("cannot open the store in {}", o.data_dir.display()))?;
    tracing::debug!(?recovery, "store opened");
    tracing::info!(schedule = %o.gc.schedule, grace = ?o.gc.grace, max_size = ?o.gc.limits.max_size, min_free = ?o.gc.limits.min_free, "garbage collection");
    registry.configure_gc(o.gc.clone());

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
    let listener = bind(o.listen, "the registry").await?;
    servers.spawn(
        "registry",
        kache_registry::serve(
            registry.router_for(access),
            listener,
            o.server,
            shutdown::signal(),
        ),
    );
    if let Some(addr) = o.internal_listen {
        let listener = bind(addr, "the internal registry listener").await?;
        servers.spawn(
            "internal registry listener",
            kache_registry::serve(
                registry.router_for(Access::ReadWrite),
                listener,
                o.server,
                shutdown::signal(),
            ),
        );
    }
    tracing::info!(listen = %o.listen, internal = ?o.internal_listen, data_dir = %o.data_dir.display(), server = ?o.server, "registry serving");
    Ok(registry)
}

/// The proxy role: serves the kubelet on its listeners.
fn start_proxy(
    o: ProxyOptions,
    servers: &mut Servers,
    prom: &mut PromRegistry,
) -> anyhow::Result<()> {
    let proxy = Proxy::new(
        ProxyConfig {
            registry: o.registry.clone(),
            registry_timeout: o.registry_timeout,
        },
        Upstream::new(o.upstream).context("configuring the proxy's upstream client")?,
        ProxyMetrics::new(prom),
    );
    for l in bind_proxy(&o.listen)? {
        servers.spawn(
            "proxy",
            proxy.clone().serve(l, o.server, shutdown::signal()),
        );
    }
    tracing::info!(listen = ?o.listen, registry = %o.registry, server = ?o.server, "proxy serving");
    Ok(())
}

/// Runs a registry's upkeep until its servers end, then closes it.
async fn run_registry(
    registry: Registry,
    servers: Servers,
    upload_timeout: Duration,
) -> anyhow::Result<()> {
    let upkeep = tokio::spawn(registry.clone().maintain(upload_timeout));
    let end = servers.first_end().await;
    upkeep.abort();
    registry.close().await.context("flushing access times")?;
    end
}

/// `kache registry`.
pub async fn registry(o: RegistryOptions) -> anyhow::Result<()> {
    let mut servers = Servers::default();
    let mut prom = PromRegistry::default();
    let registry = start_registry(&o, &mut servers, &mut prom).await?;
    let ops = bind(o.metrics_listen, "metrics").await?;
    let gauges = registry.clone();
    servers.spawn_ops(ops, prom, move || gauges.refresh_gauges());
    run_registry(registry, servers, o.upload_timeout).await
}

/// `kache proxy`.
pub async fn proxy(o: ProxyOptions) -> anyhow::Result<()> {
    let mut servers = Servers::default();
    let mut prom = PromRegistry::default();
    // Shared like the proxy's own port: the replacing proxy's metrics listener binds beside it.
    let ops = kache_http::net::bind_shared(o.metrics_listen)
        .with_context(|| format!("cannot listen on {} for metrics", o.metrics_listen))?;
    start_proxy(o, &mut servers, &mut prom)?;
    servers.spawn_ops(ops, prom, || {});
    servers.first_end().await
}

/// `kache dev`: the registry role and the proxy role in one process, with one metrics
/// listener for both.
pub async fn dev(r: RegistryOptions, p: ProxyOptions) -> anyhow::Result<()> {
    let mut servers = Servers::default();
    let mut prom = PromRegistry::default();
    let registry = start_registry(&r, &mut servers, &mut prom).await?;
    start_proxy(p, &mut servers, &mut prom)?;
    let ops = bind(r.metrics_listen, "metrics").await?;
    let gauges = registry.clone();
    servers.spawn_ops(ops, prom, move || gauges.refresh_gauges());
    run_registry(registry, servers, r.upload_timeout).await
}

pub async fn webhook(o: WebhookOptions) -> anyhow::Result<()> {
    let certs = kache_webhook::ReloadingCert::load(&o.tls_cert, &o.tls_key)
        .context("loading the serving certificate")?;
    let tls = kache_webhook::server_config(certs.clone())?;
    let mut prom = PromRegistry::default();
    let hook = kache_webhook::Webhook::new(o.policy, kache_webhook::WebhookMetrics::new(&mut prom));
    let mut servers = Servers::default();
    let listener = bind(o.listen, "the webhook").await?;
    let delay = o.shutdown_delay;
    servers.spawn(
        "webhook",
        kache_http::serve_tls(listener, tls, hook.router(), shutdown::signal_then(delay)),
    );
    let ops = bind(o.metrics_listen, "metrics").await?;
    servers.spawn(
        "metrics listener",
        kache_http::serve_hyper(
            ops,
            ops_router(Arc::new(prom), || {}),
            shutdown::signal_then(delay),
        ),
    );
    let watch = tokio::spawn(certs.watch(Duration::from_secs(1)));
    tracing::info!(listen = %o.listen, metrics = %o.metrics_listen, cert = %o.tls_cert.display(), "webhook serving");
    let end = servers.first_end().await;
    watch.abort();
    end
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
    let report = store.verify_with(fsck_progress()).await?;
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

/// What `kache fsck` says on stderr while it checks: a line at every tenth of the blobs, and at
/// least every few seconds when blobs are large, so a check of hours shows it is moving.
fn fsck_progress() -> impl FnMut(&VerifyProgress) + Send + 'static {
    const AT_LEAST_EVERY: Duration = Duration::from_secs(5);
    let mut last = (0, std::time::Instant::now());
    move |p| {
        let tenth = p.checked * 10 / p.total.max(1);
        if tenth > last.0 || last.1.elapsed() >= AT_LEAST_EVERY {
            eprintln!(
                "fsck: checked {} of {} blobs ({} MB), {} bad",
                p.checked,
                p.total,
                p.bytes / 1_000_000,
                p.bad
            );
            last = (tenth, std::time::Instant::now());
        }
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
        kache_http::serve_hyper(listener, app, shutdown::signal())
            .await
            .context("metrics listener failed")
    }))
}
