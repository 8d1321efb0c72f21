//! kache's registry and node proxy in the test's own process, each on a free port of 127.0.0.1:
//! the fast tier of the kit, for the crates' tests, beside the process tier (`registry`,
//! `proxy`, `webhook`: the `kache` binary as a child, for the end-to-end tests and the
//! benchmark). One way to start each, with the options a test turns; everything else as the
//! binary would have it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kache_http::ServerKind;
use kache_proxy::{Proxy, ProxyConfig, ProxyMetrics};
use kache_registry::{Access, Freshness, KeyRing, Metrics, Registry, Scoping};
use kache_store::Store;
use kache_upstream::{Upstream, UpstreamConfig};

/// A part serving on 127.0.0.1 in this process; stopped when dropped.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// The registry's store (a registry's only).
    store: Option<Arc<Store>>,
    prom: Arc<prometheus_client::registry::Registry>,
    task: Option<tokio::task::JoinHandle<()>>,
    dir: Option<tempfile::TempDir>,
}

impl Running {
    /// `base` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The part's metrics, in the text format.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.prom).unwrap();
        out
    }

    /// The value of one series, written whole (`name{labels}`); 0 when absent.
    pub fn count(&self, series: &str) -> f64 {
        crate::metrics::sample(&self.metrics(), series)
    }

    /// The registry's store, which a registry always has.
    pub fn store(&self) -> &Arc<Store> {
        self.store.as_ref().expect("a registry's store")
    }

    /// The registry's data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        self.dir
            .as_ref()
            .expect("a registry's data directory")
            .path()
    }

    /// Stops serving: connections are dropped and new ones refused, as if the host were down.
    pub async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// How a registry is started.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// With a host (`127.0.0.1:PORT`), a pull-through cache of it, over plain HTTP.
    pub pull_from: Option<String>,
    pub freshness: Freshness,
    pub access: Access,
    pub server: ServerKind,
    /// With keys, private-image scoping is on (grants live 24 h).
    pub scoping: Option<kache_wire::pull_token::Keys>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            pull_from: None,
            freshness: Freshness::tags(Duration::from_secs(3600)),
            access: Access::ReadWrite,
            server: ServerKind::Kache,
            scoping: None,
        }
    }
}

impl RegistryOptions {
    /// A pull-through cache of `host`.
    pub fn pull_from(host: &str) -> Self {
        RegistryOptions {
            pull_from: Some(host.to_owned()),
            ..Self::default()
        }
    }
}

/// A registry over a new store in a temporary directory.
pub async fn registry(o: RegistryOptions) -> Running {
    install_tls_provider();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap().0);
    let mut prom = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut prom);
    let registry = match &o.pull_from {
        Some(host) => {
            Registry::with_pull_through(store.clone(), metrics, upstream_client(host), o.freshness)
        }
        None => Registry::new(store.clone(), metrics),
    };
    let registry = match o.scoping {
        Some(keys) => registry.scoped(Scoping::new(KeyRing::fixed(keys))),
        None => registry,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = registry.router_for(o.access);
    let task = tokio::spawn(async move {
        let _ = kache_registry::serve(app, listener, o.server, std::future::pending()).await;
    });
    Running {
        addr,
        base: format!("http://{addr}"),
        store: Some(store),
        prom: Arc::new(prom),
        task: Some(task),
        dir: Some(dir),
    }
}

/// How a node proxy is started.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// The registry's base URL.
    pub registry: String,
    /// The upstream host it falls back to (`127.0.0.1:PORT`), over plain HTTP.
    pub upstream: String,
    pub registry_timeout: Duration,
    pub server: ServerKind,
    /// The registry scopes private images.
    pub private_images: bool,
}

impl ProxyOptions {
    /// A proxy of `registry` falling back to `upstream`, waiting 2 s for the registry.
    pub fn new(registry: &str, upstream: &str) -> Self {
        ProxyOptions {
            registry: registry.to_owned(),
            upstream: upstream.to_owned(),
            registry_timeout: Duration::from_secs(2),
            server: ServerKind::Kache,
            private_images: false,
        }
    }
}

/// A node proxy.
pub async fn proxy(o: ProxyOptions) -> Running {
    install_tls_provider();
    let mut prom = prometheus_client::registry::Registry::default();
    let p = Proxy::new(
        ProxyConfig {
            registry: o.registry.parse().unwrap(),
            registry_timeout: o.registry_timeout,
            private_images: o.private_images,
        },
        upstream_client(&o.upstream),
        ProxyMetrics::new(&mut prom),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = p.serve(listener, o.server, std::future::pending()).await;
    });
    Running {
        addr,
        base: format!("http://{addr}"),
        store: None,
        prom: Arc::new(prom),
        task: Some(task),
        dir: None,
    }
}

/// An upstream client that reaches `host` over plain HTTP: 1 s to connect, 5 s to answer.
pub fn upstream_client(host: &str) -> Upstream {
    install_tls_provider();
    Upstream::new(UpstreamConfig {
        insecure_registries: vec![host.to_owned()],
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(5),
        ..UpstreamConfig::default()
    })
    .unwrap()
}

/// The one TLS provider of the project; reqwest is built without a default.
fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
