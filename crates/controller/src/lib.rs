//! The kache controllers (`kache controller`).
//!
//! - Pods the webhook rewrote (label `kache.io/managed`) and the pod templates of workloads get
//!   one CachedImage per original image ([`ensure`]).
//! - Each CachedImage is reconciled ([`images`]): usage recomputed from the live pods, the
//!   registry asked to warm it for the nodes' platforms, expiry set, cleared or carried out.
//! - The registry is told which images the cluster keeps, and which are pinned ([`kept`]).
//! - Each NodeImageSet is warmed, resolved to digests and held on its nodes by a DaemonSet
//!   ([`node_images`], [`holder`]).
//! - Only the replica holding the Lease runs them ([`lease`]).
//!
//! What they decide is pure ([`decide`]), so it can be asked without a cluster: when does an
//! image no pod uses any more leave the cache?
//!
//! ```
//! use std::time::Duration;
//!
//! use k8s_openapi::jiff::Timestamp;
//! use kache_api::CachedImageSpec;
//! use kache_controller::decide::{self, Expiry};
//!
//! let spec = CachedImageSpec {
//!     source_image: "docker.io/library/nginx:1.27".into(),
//!     ..CachedImageSpec::default()
//! };
//! let now = Timestamp::from_second(1_800_000_000).unwrap();
//! let delay = Duration::from_secs(24 * 3600);
//! // A live pod uses it: it stays.
//! assert_eq!(decide::expiry(&spec, 1, now, delay), Expiry::Keep);
//! // None does: it goes a day from now...
//! assert_eq!(decide::expiry(&spec, 0, now, delay), Expiry::At(decide::add(now, delay)));
//! // ...unless it is retained.
//! let retained = CachedImageSpec { retain: true, ..spec };
//! assert_eq!(decide::expiry(&retained, 0, now, delay), Expiry::Keep);
//! ```

pub mod decide;
mod ensure;
mod events;
mod holder;
mod images;
mod kept;
pub mod lease;
mod metrics;
mod node_images;
mod phase;
pub mod registry;
pub mod tenancy;
mod workloads;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kache_api::CachedImage;
use kache_api::policy::Policy;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::Mutex;
use tracing::{info, warn};

pub use ensure::Ensurer;
pub use holder::Holder;
pub use lease::LeaseConfig;
pub use metrics::ControllerMetrics;
pub use registry::{RegistryClient, RegistryError};
pub use workloads::WorkloadKind;

/// How the controllers behave.
#[derive(Debug, Clone)]
pub struct Config {
    /// Unused images go this long after their last pod.
    pub expiry_delay: Duration,
    /// A cached image is re-confirmed with the registry this often.
    pub resync: Duration,
    /// Workload kinds whose pod templates are pre-cached.
    pub workloads: Vec<WorkloadKind>,
    /// Which pods and images are cached: the webhook's policy, so that a workload's images are
    /// pre-cached only when its pods will be rewritten.
    pub policy: Arc<Policy>,
    /// Leader election; `None` runs the controllers at once (a single replica).
    pub lease: Option<LeaseConfig>,
    /// The name events are reported under.
    pub instance: String,
    /// Private-image scoping: token Secrets and grants.
    pub scoping: Option<tenancy::Scoping>,
    /// NodeImageSets: where their DaemonSets run and with which image; `None` leaves them
    /// alone.
    pub node_images: Option<Holder>,
}

/// What every reconcile shares.
pub(crate) struct Context {
    pub client: Client,
    pub config: Config,
    pub registry: RegistryClient,
    pub pods: Store<Pod>,
    /// True once the pod cache holds every pod. `Store::wait_until_ready` wakes only the last of
    /// several concurrent waiters (kube-runtime 5's `DelayedInit` keeps one waker), so reconciles
    /// wait on this channel instead, which wakes them all.
    pub pods_ready: tokio::sync::watch::Receiver<bool>,
    pub nodes: Store<Node>,
    pub events: events::Events,
    pub metrics: ControllerMetrics,
    /// Consecutive failures per CachedImage, for the backoff.
    pub failures: Mutex<std::collections::HashMap<String, u32>>,
    /// When each namespace's grant on each image was last checked.
    pub checked: tenancy::Checked,
}

/// Runs the controllers until `shutdown` resolves: with leader election, only while this replica
/// holds the Lease.
pub async fn run(
    client: Client,
    config: Config,
    registry: RegistryClient,
    metrics: ControllerMetrics,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    let Some(lease) = config.lease.clone() else {
        metrics.set_leader(true);
        tokio::select! {
            _ = run_controllers(client, config, registry, metrics.clone()) => {}
            _ = &mut shutdown => {}
        }
        return;
    };
    let renew = lease.duration / 3;
    loop {
        // Candidate: wait for the Lease.
        loop {
            match tokio::time::timeout(renew, lease::try_acquire(&client, &lease)).await {
                Ok(Ok(lease::Held::Leader)) => break,
                Ok(Ok(lease::Held::Follower)) => {}
                Ok(Err(e)) => warn!(error = %e, "leader election: cannot read or write the Lease"),
                Err(_) => warn!(timeout = ?renew, "leader election: no answer from the API server"),
            }
            tokio::select! {
                _ = tokio::time::sleep(renew) => {}
                _ = &mut shutdown => return,
            }
        }
        info!(identity = %lease.identity, "leader: running the controllers");
        metrics.set_leader(true);
        // A task of its own: the controllers keep running while a renewal waits on the API.
        let mut controllers = tokio::spawn(run_controllers(
            client.clone(),
            config.clone(),
            registry.clone(),
            metrics.clone(),
        ));
        let mut last_renewal = tokio::time::Instant::now();
        let lost = loop {
            tokio::select! {
                _ = &mut controllers => break false,
                _ = &mut shutdown => {
                    controllers.abort();
                    metrics.set_leader(false);
                    metrics.count_images(None);
                    metrics.count_sets(None);
                    // Bounded: the pod's grace period is short, and a Lease left behind only
                    // delays the next leader by its duration.
                    match tokio::time::timeout(renew, lease::release(&client, &lease)).await {
                        Ok(Ok(())) => info!("leader election: Lease released"),
                        Ok(Err(e)) => warn!(error = %e, "leader election: cannot release the Lease"),
                        Err(_) => warn!("leader election: no answer while releasing the Lease"),
                    }
                    return;
                }
                _ = tokio::time::sleep(renew) => {}
            }
            // Bounded, and counted from when it was sent (the renewTime it writes): an API
            // server that hangs must not keep this replica leading past the lease.
            let sent = tokio::time::Instant::now();
            match tokio::time::timeout(renew, lease::try_acquire(&client, &lease)).await {
                Ok(Ok(lease::Held::Leader)) => last_renewal = sent,
                Ok(Ok(lease::Held::Follower)) => break true,
                Ok(Err(e)) => warn!(error = %e, "leader election: renewal failed"),
                Err(_) => warn!(timeout = ?renew, "leader election: renewal timed out"),
            }
            // Step down before the lease lapses: another replica may take it after `duration`.
            if last_renewal.elapsed() + renew >= lease.duration {
                break true;
            }
        };
        controllers.abort();
        metrics.set_leader(false);
        metrics.count_images(None);
        metrics.count_sets(None);
        if lost {
            warn!("leader election: lease lost, controllers stopped");
        }
    }
}

/// The pod, node and CachedImage watches and the controllers on them; never returns unless
/// every stream ends.
async fn run_controllers(
    client: Client,
    config: Config,
    registry: RegistryClient,
    metrics: ControllerMetrics,
) {
    let (pod_store, pod_writer) = reflector::store::<Pod>();
    let (node_store, node_writer) = reflector::store::<Node>();
    let pods = watcher(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().labels(kache_api::pod_marks::MANAGED_LABEL),
    )
    .default_backoff()
    .reflect(pod_writer)
    .touched_objects();
    let nodes = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(node_writer)
        .touched_objects()
        .for_each(|_| async {});

    // The CachedImage watch is the controller's trigger; its deletions also go to the ensurer
    // (below), so an image deleted by hand while pods use it comes back at once.
    let (image_store, image_writer) = reflector::store::<CachedImage>();
    let (deleted_tx, mut deleted_rx) = tokio::sync::mpsc::unbounded_channel::<CachedImage>();
    let images = watcher(
        Api::<CachedImage>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(image_writer)
    .inspect(move |ev| {
        if let Ok(watcher::Event::Delete(ci)) = ev {
            let _ = deleted_tx.send(ci.clone());
        }
    })
    .touched_objects();
    let controller = Controller::for_stream(images, image_store.clone());
    metrics.count_images(Some(image_store.clone()));
    let tokens = config.scoping.clone().map(|s| {
        Arc::new(tenancy::Tokens::new(
            client.clone(),
            s,
            config.policy.proxy_port,
        ))
    });
    let refresh_tokens = {
        let tokens = tokens.clone();
        async move {
            match tokens {
                Some(t) => t.refresh().await,
                None => std::future::pending().await,
            }
        }
    };
    let ensurer = Ensurer::new(client.clone(), image_store.clone(), tokens.clone());
    let events = events::Events::new(client.clone(), "kache-controller", &config.instance);
    let (ready_tx, pods_ready) = tokio::sync::watch::channel(false);
    let pods_ready_signal = {
        let store = pod_store.clone();
        async move {
            if store.wait_until_ready().await.is_ok() {
                ready_tx.send_replace(true);
            }
        }
    };
    // NodeImageSets, when the controller runs them and the API server serves them (`helm
    // upgrade` does not install a new CRD): their store also feeds the kept list and the metrics.
    let node_images_on = config.node_images.is_some() && node_images::served(&client).await;
    let (set_store, set_writer) = reflector::store::<kache_api::NodeImageSet>();
    let set_stream = node_images_on.then(|| {
        watcher(
            Api::<kache_api::NodeImageSet>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(set_writer)
        .touched_objects()
    });
    let sets = set_stream.is_some().then(|| set_store.clone());
    metrics.count_sets(sets.clone());
    let kept = kept::run(
        image_store.clone(),
        pod_store.clone(),
        sets,
        pods_ready.clone(),
        registry.clone(),
    );
    let node_images = {
        let holder = config.node_images.clone().filter(|_| node_images_on);
        let ctx = holder.map(|holder| {
            let (holder_pods, holder_pod_writer) = reflector::store::<Pod>();
            let (holder_sets, holder_set_writer) = reflector::store::<DaemonSet>();
            let ctx = node_images::SetContext {
                client: client.clone(),
                registry: registry.clone(),
                holder,
                proxy_port: config.policy.proxy_port,
                nodes: node_store.clone(),
                pods: holder_pods,
                daemon_sets: holder_sets,
                events: events::Events::new(client.clone(), "kache-controller", &config.instance),
                tokens,
                scoping: config.scoping.clone(),
                checked: tenancy::Checked::default(),
                failures: Mutex::default(),
                metrics: metrics.clone(),
            };
            (ctx, holder_pod_writer, holder_set_writer)
        });
        async move {
            match (ctx, set_stream) {
                (Some((ctx, pods, daemon_sets)), Some(stream)) => {
                    node_images::run(set_store, stream, ctx, pods, daemon_sets).await
                }
                _ => std::future::pending().await,
            }
        }
    };
    let ctx = Arc::new(Context {
        pods_ready,
        client: client.clone(),
        config: config.clone(),
        registry,
        pods: pod_store,
        nodes: node_store,
        events,
        metrics,
        failures: Mutex::default(),
        checked: tenancy::Checked::default(),
    });

    // Every pod event also goes to the ensurer, which creates the CachedImages pods need.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Pod>();
    let pod_tx = tx.clone();
    let pods = pods.inspect(move |ev| {
        if let Ok(pod) = ev {
            let _ = pod_tx.send(pod.clone());
        }
    });
    // A deleted CachedImage whose image live pods still run: those pods go to the ensurer again.
    let recreate = {
        let pods = ctx.pods.clone();
        async move {
            while let Some(ci) = deleted_rx.recv().await {
                let image = &ci.spec.source_image;
                let users: Vec<_> = pods
                    .state()
                    .into_iter()
                    .filter(|p| decide::uses(p, image))
                    .collect();
                if !users.is_empty() {
                    info!(%image, pods = users.len(), "CachedImage deleted while pods use it: creating it again");
                }
                for pod in users {
                    let _ = tx.send(pod.as_ref().clone());
                }
            }
        }
    };
    let image_controller = controller
        .watches_stream(pods, images::images_of_pod)
        .run(images::reconcile, images::error_policy, ctx)
        .for_each(|_| async {});
    let workloads = workloads::run(
        client.clone(),
        config.workloads.clone(),
        config.policy.clone(),
        ensurer.clone(),
    );
    tokio::join!(
        pods_ready_signal,
        image_controller,
        nodes,
        ensurer.run_pods(rx),
        recreate,
        workloads,
        kept,
        refresh_tokens,
        node_images
    );
}
