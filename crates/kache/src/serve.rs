//! Wiring: each process binds its roles' listeners (`:0` allowed), says where they are, and
//! runs the roles (their lifecycle is theirs: kache-registry's `RegistryRole`, the proxy's,
//! the webhook's and the controller's `run`) beside one metrics listener.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kache_http::{ServerKind, Servers, Shutdown, ops_router};
use kache_oci::credentials::DockerConfig;
use kache_proxy::{Proxy, ProxyConfig, ProxyMetrics};
use kache_registry::{Access, RegistryRole, RoleConfig};
use kache_store::{Store, VerifyProgress};
use kache_upstream::{Upstream, UpstreamConfig};
use prometheus_client::registry::Registry as PromRegistry;
use tokio::net::TcpListener;

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
    pub freshness: kache_registry::Freshness,
    pub server: ServerKind,
    pub gc: kache_registry::GcConfig,
    /// Private-image scoping, when on.
    pub scoping: Option<kache_registry::Scoping>,
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
    /// The registry scopes private images (`--private-images`).
    pub private_images: bool,
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

/// Where a process listens, once bound: each listener's actual address (a `:0` one gets a
/// port of the system's choosing), said in the log and written to `--ready-file` when given,
/// so that whoever started the process can find it.
#[derive(Debug, Default)]
pub struct Bound(Vec<(&'static str, SocketAddr)>);

impl Bound {
    /// The first address bound under `name`.
    fn first(&self, name: &str) -> Option<SocketAddr> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, a)| *a)
    }

    fn add(&mut self, name: &'static str, listener: &TcpListener) -> anyhow::Result<()> {
        self.0.push((name, listener.local_addr()?));
        Ok(())
    }

    /// Logs every address, and writes them to `ready_file` (JSON, `{"name": "addr"}`; a name
    /// bound more than once maps to a list), whole or not at all.
    pub fn announce(&self, role: &str, ready_file: Option<&Path>) -> anyhow::Result<()> {
        let mut json = serde_json::Map::new();
        for (name, addr) in &self.0 {
            tracing::info!(role, listener = name, addr = %addr, "listening");
            let value = serde_json::Value::String(addr.to_string());
            match json.get_mut(*name) {
                None => {
                    json.insert((*name).to_owned(), value);
                }
                Some(serde_json::Value::Array(list)) => list.push(value),
                Some(first) => *first = serde_json::Value::Array(vec![first.take(), value]),
            }
        }
        let Some(path) = ready_file else {
            return Ok(());
        };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::Value::Object(json).to_string())
            .and_then(|()| std::fs::rename(&tmp, path))
            .with_context(|| format!("writing the ready file {}", path.display()))
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

/// The registry role, its store open and its listeners bound.
async fn registry_role(
    o: RegistryOptions,
    bound: &mut Bound,
    prom: &mut PromRegistry,
) -> anyhow::Result<RegistryRole> {
    let upstream = Upstream::new(o.upstream).context("configuring the upstream client")?;
    let config = RoleConfig {
        data_dir: o.data_dir.clone(),
        upstream: Some(upstream),
        freshness: o.freshness,
        upload_timeout: o.upload_timeout,
        gc: o.gc,
        scoping: o.scoping,
        server: o.server,
    };
    let (mut role, recovery) = RegistryRole::open(config, prom)
        .await
        .with_context(|| format!("cannot open the store in {}", o.data_dir.display()))?;
    tracing::debug!(?recovery, "store opened");
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
    bound.add("listen", &listener)?;
    role.listen(listener, access);
    if let Some(addr) = o.internal_listen {
        let listener = bind(addr, "the internal registry listener").await?;
        bound.add("internal", &listener)?;
        role.listen(listener, Access::ReadWrite);
    }
    tracing::info!(data_dir = %o.data_dir.display(), server = ?o.server, "registry serving");
    Ok(role)
}

/// The proxy role and its listeners.
fn proxy_role(
    o: &ProxyOptions,
    bound: &mut Bound,
    prom: &mut PromRegistry,
) -> anyhow::Result<(Proxy, Vec<TcpListener>)> {
    let proxy = Proxy::new(
        ProxyConfig {
            registry: o.registry.clone(),
            registry_timeout: o.registry_timeout,
            private_images: o.private_images,
        },
        Upstream::new(o.upstream.clone()).context("configuring the proxy's upstream client")?,
        ProxyMetrics::new(prom),
    );
    let listeners = bind_proxy(&o.listen)?;
    for l in &listeners {
        bound.add("proxy", l)?;
    }
    tracing::info!(registry = %o.registry, server = ?o.server, "proxy serving");
    Ok((proxy, listeners))
}

/// `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`.
fn serve_ops(
    servers: &mut Servers,
    listener: TcpListener,
    prom: PromRegistry,
    before_scrape: impl Fn() + Clone + Send + Sync + 'static,
    shutdown: Shutdown,
) {
    let app = ops_router(Arc::new(prom), before_scrape);
    servers.spawn(
        "metrics listener",
        kache_http::serve_hyper(listener, app, shutdown.wait()),
    );
}

/// `kache registry`.
pub async fn registry(o: RegistryOptions, ready_file: Option<&Path>) -> anyhow::Result<()> {
    let mut prom = PromRegistry::default();
    let mut bound = Bound::default();
    let metrics_listen = o.metrics_listen;
    let role = registry_role(o, &mut bound, &mut prom).await?;
    let ops = bind(metrics_listen, "metrics").await?;
    bound.add("metrics", &ops)?;
    bound.announce("registry", ready_file)?;
    let shutdown = Shutdown::on_signal(Duration::ZERO);
    let mut servers = Servers::default();
    let gauges = role.registry().clone();
    serve_ops(
        &mut servers,
        ops,
        prom,
        move || gauges.refresh_gauges(),
        shutdown.clone(),
    );
    servers.spawn("registry", role.run(shutdown));
    Ok(servers.first_end().await?)
}

/// `kache proxy`.
pub async fn proxy(o: ProxyOptions, ready_file: Option<&Path>) -> anyhow::Result<()> {
    let mut prom = PromRegistry::default();
    let mut bound = Bound::default();
    // Shared like the proxy's own port: the replacing proxy's metrics listener binds beside it.
    let ops = kache_http::net::bind_shared(o.metrics_listen)
        .with_context(|| format!("cannot listen on {} for metrics", o.metrics_listen))?;
    let (proxy, listeners) = proxy_role(&o, &mut bound, &mut prom)?;
    bound.add("metrics", &ops)?;
    bound.announce("proxy", ready_file)?;
    let shutdown = Shutdown::on_signal(Duration::ZERO);
    let mut servers = Servers::default();
    serve_ops(&mut servers, ops, prom, || {}, shutdown.clone());
    servers.spawn("proxy", proxy.run(listeners, o.server, shutdown));
    Ok(servers.first_end().await?)
}

/// `kache dev`: the registry role and the proxy role in one process, with one metrics
/// listener for both.
pub async fn dev(
    r: RegistryOptions,
    p: ProxyOptions,
    ready_file: Option<&Path>,
) -> anyhow::Result<()> {
    let mut prom = PromRegistry::default();
    let mut bound = Bound::default();
    let metrics_listen = r.metrics_listen;
    let registry = registry_role(r, &mut bound, &mut prom).await?;
    // The proxy reads from the registry where it was bound (`:0` is a port of the system's).
    let at = bound.first("listen").context("the registry's listener")?;
    let p = ProxyOptions {
        registry: format!("http://{at}").parse()?,
        ..p
    };
    let (proxy, listeners) = proxy_role(&p, &mut bound, &mut prom)?;
    let ops = bind(metrics_listen, "metrics").await?;
    bound.add("metrics", &ops)?;
    bound.announce("dev", ready_file)?;
    if let Some(proxy) = bound.first("proxy") {
        tracing::info!(
            "kache dev: pull through the proxy with `skopeo copy --src-tls-verify=false docker://{proxy}/docker.io/library/<image>:<tag> ...`; push to the registry at {at}"
        );
    }
    let shutdown = Shutdown::on_signal(Duration::ZERO);
    let mut servers = Servers::default();
    let gauges = registry.registry().clone();
    serve_ops(
        &mut servers,
        ops,
        prom,
        move || gauges.refresh_gauges(),
        shutdown.clone(),
    );
    servers.spawn("proxy", proxy.run(listeners, p.server, shutdown.clone()));
    servers.spawn("registry", registry.run(shutdown));
    Ok(servers.first_end().await?)
}

/// `kache webhook`.
pub async fn webhook(o: WebhookOptions, ready_file: Option<&Path>) -> anyhow::Result<()> {
    let cert = kache_webhook::ReloadingCert::load(&o.tls_cert, &o.tls_key)
        .context("loading the serving certificate")?;
    let mut prom = PromRegistry::default();
    let hook = kache_webhook::Webhook::new(o.policy, kache_webhook::WebhookMetrics::new(&mut prom));
    let mut bound = Bound::default();
    let listener = bind(o.listen, "the webhook").await?;
    bound.add("listen", &listener)?;
    let ops = bind(o.metrics_listen, "metrics").await?;
    bound.add("metrics", &ops)?;
    bound.announce("webhook", ready_file)?;
    tracing::info!(cert = %o.tls_cert.display(), "webhook serving");
    let shutdown = Shutdown::on_signal(o.shutdown_delay);
    let mut servers = Servers::default();
    serve_ops(&mut servers, ops, prom, || {}, shutdown.clone());
    servers.spawn("webhook", hook.run(listener, cert, shutdown));
    Ok(servers.first_end().await?)
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

/// Serves `/metrics`, `/healthz` and `/readyz` in the background until `shutdown` (the
/// controller's only listener), said where as [`Bound::announce`] does.
pub async fn spawn_ops(
    addr: SocketAddr,
    prom: Arc<PromRegistry>,
    before_scrape: impl Fn() + Clone + Send + Sync + 'static,
    shutdown: Shutdown,
    ready_file: Option<&Path>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let listener = bind(addr, "metrics").await?;
    let mut bound = Bound::default();
    bound.add("metrics", &listener)?;
    bound.announce("controller", ready_file)?;
    let app = ops_router(prom, before_scrape);
    Ok(tokio::spawn(async move {
        kache_http::serve_hyper(listener, app, shutdown.wait())
            .await
            .context("metrics listener failed")
    }))
}
