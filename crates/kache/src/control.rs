//! `kache controller`: wiring only; the controllers live in crates/controller.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kache_controller::{Config, ControllerMetrics, LeaseConfig, RegistryClient, WorkloadKind};

use crate::ControllerArgs;
use crate::serve;

pub async fn controller(a: ControllerArgs) -> anyhow::Result<()> {
    let workloads = if a.precache_kinds.iter().any(|k| k == "none") {
        Vec::new()
    } else {
        a.precache_kinds
            .iter()
            .map(|k| k.parse::<WorkloadKind>().map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let identity = a
        .identity
        .clone()
        .unwrap_or_else(|| format!("kache-controller-{}", std::process::id()));
    let lease = a.lease_namespace.clone().map(|namespace| LeaseConfig {
        namespace,
        name: a.lease_name.clone(),
        identity: identity.clone(),
        duration: a.lease_duration.max(Duration::from_secs(3)),
    });
    let token = match &a.registry_token_file {
        Some(p) => Some(serve::read_token(p)?),
        None => None,
    };
    let registry = RegistryClient::new(&a.registry, token, a.registry_timeout)
        .context("building the registry client")?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;

    let mut prom = prometheus_client::registry::Registry::default();
    let metrics = ControllerMetrics::register(&mut prom);
    let scraped = metrics.clone();
    let ops = serve::spawn_ops(a.metrics_listen, Arc::new(prom), move || scraped.refresh()).await?;
    tracing::info!(registry = %a.registry, expiry_delay = ?a.expiry_delay, ?workloads, "controller starting");
    kache_controller::run(
        client,
        Config {
            expiry_delay: a.expiry_delay,
            resync: a.resync,
            workloads,
            lease,
            instance: identity,
        },
        registry,
        metrics,
        serve::shutdown_signal(),
    )
    .await;
    ops.abort();
    Ok(())
}
