//! `kache controller`: wiring only; the controllers live in crates/controller.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kache_controller::{
    Config, ControllerMetrics, Holder, LeaseConfig, RegistryClient, WorkloadKind,
};

use crate::ControllerArgs;
use crate::serve;

pub async fn controller(
    a: ControllerArgs,
    ready_file: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let policy = Arc::new(a.policy.policy()?);
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
    let scoping = match (&a.pull_token_keys, &a.policy.pull_secret) {
        (Some(dir), Some(name)) => {
            anyhow::ensure!(
                !a.grant_renewal.is_zero(),
                "--grant-renewal must be longer than 0s"
            );
            let s =
                kache_controller::tenancy::Scoping::new(dir.clone(), name.clone(), a.grant_renewal)
                    .with_context(|| format!("reading the pull-token keys in {}", dir.display()))?;
            Some(s)
        }
        _ => None,
    };
    let token = a.registry.token()?;
    let registry = RegistryClient::new(&a.registry.registry, token, a.registry_timeout)
        .context("building the registry client")?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;

    let mut prom = prometheus_client::registry::Registry::default();
    let metrics = ControllerMetrics::register(&mut prom);
    let scraped = metrics.clone();
    let shutdown = kache_http::Shutdown::on_signal(Duration::ZERO);
    let ops = serve::spawn_ops(
        a.metrics_listen,
        Arc::new(prom),
        move || scraped.refresh(),
        shutdown.clone(),
        ready_file,
    )
    .await?;
    tracing::info!(registry = %a.registry.registry, expiry_delay = ?a.expiry_delay, ?workloads, "controller starting");
    kache_controller::run(
        client,
        Config {
            expiry_delay: a.expiry_delay,
            resync: a.resync,
            workloads,
            policy,
            lease,
            instance: identity,
            scoping,
            node_images: match (a.node_images_namespace, a.node_images_image) {
                (Some(namespace), Some(image)) => Some(Holder {
                    namespace,
                    image,
                    image_pull_policy: a.node_images_pull_policy,
                    image_pull_secrets: a.node_images_pull_secrets,
                }),
                _ => None,
            },
        },
        registry,
        metrics,
        shutdown.wait(),
    )
    .await;
    ops.abort();
    Ok(())
}

/// `kache gc`: one collection through the registry's admin route, its report printed.
pub async fn gc(
    registry: &str,
    token: Option<String>,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    let client = RegistryClient::new(registry, token, Duration::from_secs(24 * 3600))
        .context("building the registry client")?;
    let report = client.collect(dry_run).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    println!(
        "{verb} {} blobs ({} manifests), {} in {:.2}s ({:.2}s of work)",
        report.removed_blobs,
        report.removed_manifests,
        bytes(report.removed_bytes),
        report.duration_seconds,
        report.worked_seconds
    );
    println!(
        "marked {} manifests and {} blobs; {} candidates kept because they were in use; {} abandoned uploads removed",
        report.marked_manifests, report.marked_blobs, report.kept_in_use, report.expired_uploads
    );
    if let Some(p) = &report.pressure {
        println!(
            "over {}: {} to free, {} could not be freed",
            p.reason,
            bytes(p.needed_bytes),
            bytes(p.unmet_bytes)
        );
    }
    let verb = if report.dry_run {
        "would evict"
    } else {
        "evicted"
    };
    for i in &report.evicted_images {
        println!("{verb} {i}");
    }
    println!("the store holds {}", bytes(report.store_bytes));
    Ok(())
}

/// `1234567` → `1.2 MiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
