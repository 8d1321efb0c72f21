//! The registry role as a process runs it, in order: open the store (recovering what a crash
//! left), configure garbage collection, serve a router per listener, keep the store up (access
//! times, abandoned uploads, collections on schedule and under pressure) while they serve, and
//! close the store once they stopped. The binary binds the listeners (any may be `:0`) and says
//! where they are; everything in between is here.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use kache_http::{ServerKind, Servers, Shutdown};
use kache_store::Recovery;
use kache_upstream::Upstream;
use tokio::net::TcpListener;

use crate::{Access, Freshness, GcConfig, Metrics, Registry, Scoping};

/// What the registry role is made of, from flags.
#[derive(Debug)]
pub struct RoleConfig {
    /// Where the store is.
    pub data_dir: PathBuf,
    /// The upstream client: with one, repositories named `<host>/<path>` are pulled through.
    pub upstream: Option<Upstream>,
    /// When a cached tag is re-validated upstream, and how long a client waits for it.
    pub freshness: Freshness,
    /// Upload sessions untouched for this long are removed.
    pub upload_timeout: Duration,
    pub gc: GcConfig,
    /// Private-image scoping, when on (it needs the upstream).
    pub scoping: Option<Scoping>,
    /// Which HTTP server answers on every listener.
    pub server: ServerKind,
}

/// A registry with its store open, and the listeners it serves on.
#[derive(Debug)]
pub struct RegistryRole {
    registry: Registry,
    listeners: Vec<(TcpListener, Access)>,
    upload_timeout: Duration,
    server: ServerKind,
}

impl RegistryRole {
    /// Opens the store in `config.data_dir` (off the async runtime: recovery reads the whole
    /// index) and a registry over it, its metrics registered in `prom`.
    pub async fn open(
        config: RoleConfig,
        prom: &mut prometheus_client::registry::Registry,
    ) -> kache_store::Result<(Self, Recovery)> {
        let pull = config.upstream.map(|u| (u, config.freshness));
        let (mut registry, recovery) =
            Registry::open(&config.data_dir, Metrics::new(prom), pull).await?;
        if let Some(scoping) = config.scoping {
            tracing::info!(keys = ?scoping.keys.keys(), grant_ttl = ?scoping.grant_ttl, private_registries = ?scoping.private_registries, "private-image scoping on");
            registry = registry.scoped(scoping);
        }
        tracing::info!(schedule = %config.gc.schedule, grace = ?config.gc.grace, max_size = ?config.gc.limits.max_size, min_free = ?config.gc.limits.min_free, "garbage collection");
        registry.configure_gc(config.gc);
        Ok((
            RegistryRole {
                registry,
                listeners: Vec::new(),
                upload_timeout: config.upload_timeout,
                server: config.server,
            },
            recovery,
        ))
    }

    /// Serves the API on `listener`, with what `access` allows.
    pub fn listen(&mut self, listener: TcpListener, access: Access) {
        self.listeners.push((listener, access));
    }

    /// The registry, for what the process shares with it (the gauges before a scrape).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Serves every listener, with the store's upkeep beside them, until `shutdown` (or the
    /// first server that fails); then closes the store.
    pub async fn run(self, shutdown: Shutdown) -> io::Result<()> {
        let mut servers = Servers::default();
        for (listener, access) in self.listeners {
            let app = self.registry.router_for(access);
            let stop = shutdown.clone().wait();
            servers.spawn("registry", crate::serve(app, listener, self.server, stop));
        }
        let upkeep = tokio::spawn(self.registry.clone().maintain(self.upload_timeout));
        let end = servers.first_end().await;
        upkeep.abort();
        self.registry.close().await.map_err(io::Error::other)?;
        end
    }
}
