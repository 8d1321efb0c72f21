//! The NodeImageSet reconcile: warm every image into the registry, resolve tags to digests, run
//! the set's DaemonSet ([`holder`](crate::holder)) and report what the nodes hold.
//!
//! Warming first means the fan-out to every node reads the in-cluster cache, never the upstream.
//! Tags are resolved again when the spec changes and every `spec.refresh`; a tag that moved
//! changes the DaemonSet's template, which then rolls out at `spec.rollout.maxUnavailable`. An
//! image that cannot be warmed keeps its last digest (nodes keep what they hold) and is reported;
//! it never blocks the others. A spec that cannot work (no image, a bad reference, a pull secret
//! that does not exist) is reported in the Ready condition and creates no DaemonSet; one that
//! already runs is left as it was, as a Deployment keeps its pods when its new template is bad.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kache_api::{
    Condition, NODE_IMAGE_SET_FINALIZER, NODE_IMAGE_SET_LABEL, NodeImageFailure, NodeImageSet,
    NodeImageSetStatus, ResolvedImage,
};
use kube::api::{DeleteParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event as Finalizing};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::events::{Events, Kind};
use crate::holder::{self, Holder, Pinned, SET_ANNOTATION};
use crate::{RegistryClient, decide, images, tenancy};

/// Images not resolved yet are tried again after this long.
const RETRY: Duration = Duration::from_secs(30);
/// A set whose nodes are not all ready is looked at again this often (pod events also wake it).
const WATCH: Duration = Duration::from_secs(15);
/// Images warmed at once.
const WARMS: usize = 4;
/// New failures reported as events per reconcile; the status lists them all.
const EVENTS_MAX: usize = 10;

/// What every reconcile of a set shares.
pub(crate) struct SetContext {
    pub client: Client,
    pub registry: RegistryClient,
    pub holder: Holder,
    pub proxy_port: u16,
    pub nodes: Store<Node>,
    /// The holder pods, in kache's namespace.
    pub pods: Store<Pod>,
    /// The holder DaemonSets, in kache's namespace.
    pub daemon_sets: Store<DaemonSet>,
    pub events: Events,
    pub tokens: Option<Arc<tenancy::Tokens>>,
    pub scoping: Option<tenancy::Scoping>,
    pub checked: tenancy::Checked,
    pub failures: Mutex<HashMap<String, u32>>,
    pub metrics: crate::ControllerMetrics,
}

/// Why a reconcile did not finish; retried with backoff.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
}

/// Runs the NodeImageSet controller on `sets` (a reflector's store and its stream) until the
/// streams end.
pub(crate) async fn run(
    sets: Store<NodeImageSet>,
    set_stream: impl futures_util::Stream<Item = Result<NodeImageSet, watcher::Error>> + Send + 'static,
    ctx: SetContext,
    pod_writer: kube::runtime::reflector::store::Writer<Pod>,
    daemon_set_writer: kube::runtime::reflector::store::Writer<DaemonSet>,
) {
    let ns = ctx.holder.namespace.clone();
    let client = ctx.client.clone();
    let owned = watcher::Config::default().labels(NODE_IMAGE_SET_LABEL);
    let pods = watcher(Api::<Pod>::namespaced(client.clone(), &ns), owned.clone())
        .default_backoff()
        .reflect(pod_writer)
        .touched_objects();
    let daemon_sets = watcher(Api::<DaemonSet>::namespaced(client, &ns), owned)
        .default_backoff()
        .reflect(daemon_set_writer)
        .touched_objects();
    Controller::for_stream(set_stream, sets)
        .watches_stream(pods, |p| set_of(&p))
        .watches_stream(daemon_sets, |d| set_of(&d))
        .run(reconcile, error_policy, Arc::new(ctx))
        .for_each(|_| async {})
        .await;
}

/// Whether the API server serves NodeImageSets; asked again while it does not answer, so that a
/// slow start does not turn them off.
pub(crate) async fn served(client: &Client) -> bool {
    let gvk = kube::api::GroupVersionKind::gvk(kache_api::GROUP, "v1alpha1", "NodeImageSet");
    for _ in 0..12 {
        match kube::discovery::pinned_kind(client, &gvk).await {
            Ok(_) => return true,
            // No such group, or the group without the kind.
            Err(kube::Error::Api(s)) if s.code == 404 => break,
            Err(kube::Error::Discovery(_)) => break,
            Err(e) => {
                warn!(error = %e, "cannot ask whether NodeImageSets are served; asking again");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
    warn!(
        "the API server does not serve NodeImageSets (kache.io/v1alpha1): they are off; apply \
         the CRDs (`kache crds | kubectl apply -f -`) and restart the controller"
    );
    false
}

/// The set a holder pod or DaemonSet belongs to (its annotation has the full name).
fn set_of<K: Resource>(o: &K) -> Option<ObjectRef<NodeImageSet>> {
    o.meta()
        .annotations
        .as_ref()?
        .get(SET_ANNOTATION)
        .map(|n| ObjectRef::new(n))
}

async fn reconcile(set: Arc<NodeImageSet>, ctx: Arc<SetContext>) -> Result<Action, Error> {
    let api: Api<NodeImageSet> = Api::all(ctx.client.clone());
    let result = finalizer::finalizer(&api, NODE_IMAGE_SET_FINALIZER, set, |event| async {
        match event {
            Finalizing::Apply(set) => apply(&set, &ctx).await,
            Finalizing::Cleanup(set) => cleanup(&set, &ctx).await,
        }
    })
    .await;
    result.map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

fn error_policy(set: Arc<NodeImageSet>, error: &Error, ctx: Arc<SetContext>) -> Action {
    ctx.metrics.reconcile_error();
    let name = set.name_any();
    let wait = images::retry_after(&ctx.failures, &name);
    warn!(%name, error = %error, retry_in = ?wait, "NodeImageSet reconcile failed");
    Action::requeue(wait)
}

/// The spec's images, normalised and without repeats, or why the spec cannot work.
pub(crate) fn validate(set: &NodeImageSet, proxy_port: u16) -> Result<Vec<String>, String> {
    let spec = &set.spec;
    if spec.images.is_empty() {
        return Err("spec.images is empty".to_owned());
    }
    spec.refresh_interval()?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, image) in spec.images.iter().enumerate() {
        let r: kache_oci::ImageReference = image
            .parse()
            .map_err(|e| format!("spec.images[{i}] {image:?} is not an image reference: {e}"))?;
        let normal = r.to_string();
        if holder::proxied_name(&r, proxy_port).is_none() {
            return Err(format!(
                "spec.images[{i}] {image:?}: its name through the node proxy would be too long"
            ));
        }
        if seen.insert(normal.clone()) {
            out.push(normal);
        }
    }
    Ok(out)
}

/// The Ready condition: its transition time kept while its status holds.
fn ready(
    old: &[Condition],
    status: bool,
    reason: &str,
    message: String,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let since = old
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: "Ready".to_owned(),
        status,
        last_transition_time: since,
        reason: Some(reason.to_owned()),
        message: Some(message),
    }
}

/// What a reconcile saw, for the Ready condition.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// Images resolved to a digest (on the DaemonSet).
    pinned: usize,
    /// Images never resolved.
    missing: usize,
    /// Whether the DaemonSet controller has counted the nodes of the current template.
    counted: bool,
    desired_nodes: i64,
    ready_nodes: i64,
}

/// The Ready condition's status, reason and message.
fn readiness(seen: &Seen, failures: &[NodeImageFailure]) -> (bool, &'static str, String) {
    if seen.pinned == 0 {
        return (
            false,
            "WarmFailed",
            "no image could be cached yet".to_owned(),
        );
    }
    if let Some(f) = failures.first() {
        let (reason, wher) = match &f.node {
            Some(n) => ("PullFailed", format!("node {n}: ")),
            None => ("WarmFailed", String::new()),
        };
        let message = format!(
            "{} failure(s); first: {wher}{}: {}",
            failures.len(),
            f.image,
            f.message.as_deref().unwrap_or(&f.reason)
        );
        return (false, reason, message);
    }
    if !seen.counted {
        return (
            false,
            "Rolling",
            "the DaemonSet controller has not counted the nodes yet".to_owned(),
        );
    }
    if seen.ready_nodes < seen.desired_nodes || seen.missing > 0 {
        let message = format!(
            "{} of {} nodes hold every image",
            seen.ready_nodes, seen.desired_nodes
        );
        return (false, "Rolling", message);
    }
    let message = format!(
        "{} node(s) hold {} image(s)",
        seen.desired_nodes, seen.pinned
    );
    (true, "AllNodesReady", message)
}

fn is_ready(conditions: &[Condition]) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

async fn apply(set: &NodeImageSet, ctx: &SetContext) -> Result<Action, Error> {
    let name = set.name_any();
    let api: Api<NodeImageSet> = Api::all(ctx.client.clone());
    let old = set.status.clone().unwrap_or_default();
    let now = Timestamp::now();
    let generation = set.metadata.generation;

    let invalid = |message: String| {
        let mut status = old.clone();
        status.observed_generation = generation;
        status.conditions = vec![ready(&old.conditions, false, "InvalidSpec", message, now)];
        status
    };
    let images = match validate(set, ctx.proxy_port) {
        Ok(images) => images,
        Err(message) => {
            report_invalid(ctx, set, &old, &message).await;
            write_status(&api, &name, &old, invalid(message)).await?;
            return Ok(Action::await_change());
        }
    };
    for r in &set.spec.pull_secrets {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &r.namespace);
        if secrets.get_opt(&r.name).await?.is_none() {
            let message = format!(
                "spec.pullSecrets: Secret {}/{} does not exist",
                r.namespace, r.name
            );
            report_invalid(ctx, set, &old, &message).await;
            write_status(&api, &name, &old, invalid(message)).await?;
            // A Secret is often created just after the set that names it.
            return Ok(Action::requeue(RETRY));
        }
    }
    let refresh = set
        .spec
        .refresh_interval()
        .unwrap_or(kache_api::DEFAULT_REFRESH);

    // Resolve: when the spec changed, at each refresh, and soon again for images never resolved.
    let prior: BTreeMap<&str, &str> = old
        .images
        .iter()
        .filter_map(|r| Some((r.image.as_str(), r.digest.as_deref()?)))
        .collect();
    let since = old
        .resolved_at
        .as_ref()
        .map(|t| now.duration_since(t.0).as_secs_f64())
        .unwrap_or(f64::INFINITY);
    let unresolved = images.iter().any(|i| !prior.contains_key(i.as_str()));
    let due = old.observed_generation != generation
        || since >= refresh.as_secs_f64()
        || (unresolved && since >= RETRY.as_secs_f64());
    let (resolved, warm_failures, resolved_at) = if due {
        let (resolved, failures) = resolve(set, ctx, &images, &prior).await;
        (resolved, failures, Some(Time(now)))
    } else {
        let resolved = images
            .iter()
            .map(|i| ResolvedImage {
                image: i.clone(),
                digest: prior.get(i.as_str()).map(|d| (*d).to_owned()),
            })
            .collect();
        let failures = old
            .failures
            .iter()
            .filter(|f| f.node.is_none() && images.contains(&f.image))
            .cloned()
            .collect();
        (resolved, failures, old.resolved_at.clone())
    };
    for f in warm_failures.iter().filter(|f| !old.failures.contains(f)) {
        let message = format!(
            "{}: {}",
            f.image,
            f.message.as_deref().unwrap_or("cannot be cached")
        );
        publish(ctx, set, Kind::Warning, "WarmFailed", &message).await;
    }

    let pinned: Vec<Pinned> = resolved
        .iter()
        .filter_map(|r| {
            Some(Pinned {
                image: r.image.clone(),
                digest: r.digest.clone()?,
            })
        })
        .collect();
    let pull_secret = grants(set, ctx, &images).await;

    let mut desired_nodes = 0;
    // Whether the DaemonSet controller has counted the nodes of every lane's current template.
    let mut counted = false;
    let mut nodes = holder::Nodes::default();
    let wanted = if pinned.is_empty() {
        Vec::new()
    } else {
        holder::daemon_sets(
            set,
            &pinned,
            &ctx.holder,
            ctx.proxy_port,
            pull_secret.as_deref(),
        )
    };
    if !wanted.is_empty() {
        let lanes: Vec<BTreeSet<String>> = wanted.iter().map(holder::pulls).collect();
        let mut have = Vec::with_capacity(wanted.len());
        for ds in wanted.iter().cloned() {
            have.push(ensure_daemon_set(ctx, set, ds).await?);
        }
        // Every lane selects the same nodes.
        desired_nodes = have
            .iter()
            .filter_map(|ds| ds.status.as_ref())
            .map(|s| i64::from(s.desired_number_scheduled))
            .max()
            .unwrap_or(0);
        counted = have.iter().all(|ds| {
            ds.status.as_ref().is_some_and(|s| {
                s.observed_generation.unwrap_or(0) >= ds.metadata.generation.unwrap_or(1)
            })
        });
        let by_proxied: BTreeMap<String, String> = pinned
            .iter()
            .filter_map(|p| Some((p.proxied(ctx.proxy_port)?, p.image.clone())))
            .collect();
        let pods = ctx.pods.state();
        let own = pods.iter().map(|p| p.as_ref()).filter(|p| {
            p.annotations().get(SET_ANNOTATION).map(String::as_str) == Some(name.as_str())
        });
        nodes = holder::read_nodes(own, &lanes, &by_proxied);
    }
    // Lanes the set no longer has (it has fewer images, or none resolved).
    let keep: BTreeSet<String> = wanted.iter().map(ResourceExt::name_any).collect();
    delete_daemon_sets(ctx, set, |ds| !keep.contains(&ds.name_any())).await?;
    for f in nodes
        .failures
        .iter()
        .filter(|f| !old.failures.contains(f))
        .take(EVENTS_MAX)
    {
        let message = format!(
            "node {}: {}: {}{}",
            f.node.as_deref().unwrap_or_default(),
            f.image,
            f.reason,
            f.message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        );
        publish(ctx, set, Kind::Warning, "PullFailed", &message).await;
    }

    let ready_nodes = nodes.ready.len() as i64;
    let mut failures = warm_failures;
    failures.extend(nodes.failures);
    let missing = resolved.iter().filter(|r| r.digest.is_none()).count();
    let seen = Seen {
        pinned: pinned.len(),
        missing,
        counted,
        desired_nodes,
        ready_nodes,
    };
    let (is_true, reason, message) = readiness(&seen, &failures);
    let condition = ready(&old.conditions, is_true, reason, message, now);
    if condition.status == "True" && !is_ready(&old.conditions) {
        publish(
            ctx,
            set,
            Kind::Normal,
            "Ready",
            condition.message.as_deref().unwrap_or(""),
        )
        .await;
    }
    let is_now_ready = condition.status == "True";
    let status = NodeImageSetStatus {
        observed_generation: generation,
        image_count: images.len() as i64,
        desired_nodes,
        ready_nodes,
        images: resolved,
        resolved_at: resolved_at.clone(),
        failures,
        conditions: vec![condition],
    };
    write_status(&api, &name, &old, status).await?;
    ctx.failures.lock().await.remove(&name);

    let next_refresh = resolved_at
        .map(|t| {
            let left = refresh.as_secs_f64() - now.duration_since(t.0).as_secs_f64();
            Duration::from_secs_f64(left.max(1.0))
        })
        .unwrap_or(RETRY);
    let mut requeue = if is_now_ready {
        next_refresh
    } else {
        next_refresh.min(WATCH)
    };
    if missing > 0 {
        requeue = requeue.min(RETRY);
    }
    if let Some(s) = &ctx.scoping {
        requeue = requeue.min(s.renew);
    }
    Ok(Action::requeue(requeue))
}

/// Warms every image for the selected nodes' platforms; an image that fails keeps its prior
/// digest and is reported.
async fn resolve(
    set: &NodeImageSet,
    ctx: &SetContext,
    images: &[String],
    prior: &BTreeMap<&str, &str>,
) -> (Vec<ResolvedImage>, Vec<NodeImageFailure>) {
    let selector = &set.spec.node_selector;
    let platforms = decide::platforms(ctx.nodes.state().iter().map(|n| n.as_ref()).filter(|n| {
        let labels = n.labels();
        selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }));
    let configs = images::pull_configs(&ctx.client, set.spec.pull_secrets.iter()).await;
    let warms: Vec<_> = images
        .iter()
        .map(|image| {
            let credentials = decide::credentials_for(image, &configs);
            warm(&ctx.registry, image, &platforms, credentials)
        })
        .collect();
    let warms = futures_util::stream::iter(warms)
        .buffered(WARMS)
        .collect::<Vec<_>>()
        .await;
    let mut resolved = Vec::new();
    let mut failures = Vec::new();
    for (image, result) in warms {
        let digest = match result {
            Ok(d) => Some(d),
            Err(message) => {
                warn!(set = %set.name_any(), %image, error = %message, "cannot warm an image of a NodeImageSet");
                failures.push(NodeImageFailure {
                    node: None,
                    image: image.clone(),
                    reason: "WarmFailed".to_owned(),
                    message: Some(message),
                });
                prior.get(image.as_str()).map(|d| (*d).to_owned())
            }
        };
        resolved.push(ResolvedImage {
            image: image.clone(),
            digest,
        });
    }
    (resolved, failures)
}

/// Warms one image: the digest it resolved to, or why not.
async fn warm<'a>(
    registry: &RegistryClient,
    image: &'a String,
    platforms: &[String],
    credentials: Option<(String, String)>,
) -> (&'a String, Result<String, String>) {
    // A set resolves its tags as the upstream has them now: that is what its refresh is for.
    let result = registry
        .warm(image, platforms, credentials, true)
        .await
        .map_err(|e| e.to_string())
        .and_then(|w| match w.failure() {
            Some(f) => Err(f),
            None => Ok(w.digest.to_string()),
        });
    (image, result)
}

/// With private-image scoping and pull secrets: kache's own namespace gets its token Secret and,
/// for each image, the grant its pods pull with (checked by the registry with the set's
/// secrets). The name of the token Secret the holder pods use, if any.
async fn grants(set: &NodeImageSet, ctx: &SetContext, images: &[String]) -> Option<String> {
    let (scoping, tokens) = (ctx.scoping.as_ref()?, ctx.tokens.as_ref()?);
    if set.spec.pull_secrets.is_empty() {
        return None;
    }
    let ns = &ctx.holder.namespace;
    tokens.ensure(ns).await;
    let secrets: Vec<_> = set.spec.pull_secrets.iter().collect();
    for image in images {
        let checked = tenancy::check_access(
            &ctx.checked,
            &ctx.client,
            &ctx.registry,
            scoping.renew,
            (image, ns),
            &secrets,
        );
        if let Some(Err(why)) = checked.await {
            let note = format!("{image}: the set's pull secrets are refused: {why}");
            publish(ctx, set, Kind::Warning, "AccessRefused", &note).await;
        }
    }
    Some(scoping.secret_name.clone())
}

/// Creates the DaemonSet, or replaces it when what the controller would write changed. Read
/// from the watch's cache: when that is behind (the create or replace conflicts), read again.
async fn ensure_daemon_set(
    ctx: &SetContext,
    set: &NodeImageSet,
    wanted: DaemonSet,
) -> Result<DaemonSet, Error> {
    let api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.holder.namespace);
    let ds_name = wanted.name_any();
    let cached = ctx
        .daemon_sets
        .get(&ObjectRef::new(&ds_name).within(&ctx.holder.namespace))
        .map(|d| (*d).clone());
    match write_daemon_set(&api, set, cached, wanted.clone()).await {
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let fresh = api.get_opt(&ds_name).await?;
            Ok(write_daemon_set(&api, set, fresh, wanted).await?)
        }
        r => Ok(r?),
    }
}

async fn write_daemon_set(
    api: &Api<DaemonSet>,
    set: &NodeImageSet,
    have: Option<DaemonSet>,
    mut wanted: DaemonSet,
) -> Result<DaemonSet, kube::Error> {
    let ds_name = wanted.name_any();
    match have {
        None => {
            info!(set = %set.name_any(), daemonset = %ds_name, "creating a holder DaemonSet");
            api.create(&PostParams::default(), &wanted).await
        }
        Some(have) if holder::spec_hash(&have) == holder::spec_hash(&wanted) => Ok(have),
        Some(have) => {
            info!(set = %set.name_any(), daemonset = %ds_name, "updating a holder DaemonSet");
            wanted.metadata.resource_version = have.metadata.resource_version;
            api.replace(&ds_name, &PostParams::default(), &wanted).await
        }
    }
}

/// Deletes the set's DaemonSets that `drop` picks, as the watch's cache knows them.
async fn delete_daemon_sets(
    ctx: &SetContext,
    set: &NodeImageSet,
    drop: impl Fn(&DaemonSet) -> bool,
) -> Result<(), Error> {
    let api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.holder.namespace);
    let name = set.name_any();
    let doomed = ctx
        .daemon_sets
        .state()
        .into_iter()
        .filter(|ds| ds.annotations().get(SET_ANNOTATION) == Some(&name) && drop(ds));
    for ds in doomed {
        let ds_name = ds.name_any();
        match api.delete(&ds_name, &DeleteParams::background()).await {
            Ok(_) => info!(set = %name, daemonset = %ds_name, "holder DaemonSet deleted"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The set is going: its DaemonSets go first (their owner reference would have the cluster's
/// garbage collector remove them too, later).
async fn cleanup(set: &NodeImageSet, ctx: &SetContext) -> Result<Action, Error> {
    delete_daemon_sets(ctx, set, |_| true).await?;
    ctx.failures.lock().await.remove(&set.name_any());
    Ok(Action::await_change())
}

/// An invalid spec is told once per message, not at every reconcile.
async fn report_invalid(
    ctx: &SetContext,
    set: &NodeImageSet,
    old: &NodeImageSetStatus,
    message: &str,
) {
    let told = old.conditions.iter().any(|c| {
        c.reason.as_deref() == Some("InvalidSpec") && c.message.as_deref() == Some(message)
    });
    if !told {
        warn!(set = %set.name_any(), %message, "NodeImageSet spec cannot work");
        publish(ctx, set, Kind::Warning, "InvalidSpec", message).await;
    }
}

/// Writes the status when it changed, as for CachedImages.
async fn write_status(
    api: &Api<NodeImageSet>,
    name: &str,
    old: &NodeImageSetStatus,
    new: NodeImageSetStatus,
) -> Result<(), Error> {
    Ok(images::write_status(api, name, old, new).await?)
}

/// Publishes an event about a set; a refusal is logged, never a failed reconcile.
async fn publish(ctx: &SetContext, set: &NodeImageSet, kind: Kind, reason: &str, note: &str) {
    if let Err(e) = ctx
        .events
        .publish(set.object_ref(&()), kind, reason, note)
        .await
    {
        warn!(name = %set.name_any(), error = %e, reason, "event not recorded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kache_api::NodeImageSetSpec;

    fn set(images: &[&str], refresh: Option<&str>) -> NodeImageSet {
        NodeImageSet::new(
            "s",
            NodeImageSetSpec {
                images: images.iter().map(|s| (*s).to_owned()).collect(),
                refresh: refresh.map(str::to_owned),
                ..NodeImageSetSpec::default()
            },
        )
    }

    #[test]
    fn images_are_normalised_once_each_in_the_spec_s_order() {
        let got = validate(
            &set(
                &["redis:7", "python:3.12", "docker.io/library/redis:7"],
                None,
            ),
            7439,
        );
        assert_eq!(
            got.unwrap(),
            ["docker.io/library/redis:7", "docker.io/library/python:3.12"]
        );
    }

    #[test]
    fn a_spec_that_cannot_work_says_which_field_and_entry() {
        let empty = validate(&set(&[], None), 7439).unwrap_err();
        assert_eq!(empty, "spec.images is empty");
        let bad = validate(&set(&["redis:7", "Not A Ref"], None), 7439).unwrap_err();
        assert!(bad.starts_with("spec.images[1] \"Not A Ref\""), "{bad}");
        let refresh = validate(&set(&["redis:7"], Some("soon")), 7439).unwrap_err();
        assert!(refresh.starts_with("spec.refresh:"), "{refresh}");
        let short = validate(&set(&["redis:7"], Some("5s")), 7439).unwrap_err();
        assert!(short.contains("shorter than 1m"), "{short}");
        // Valid (245 characters) but not once the proxy's host is in front.
        let long = format!("registry.local/{}:v1", "a/".repeat(114) + "b");
        let too_long = validate(&set(&[&long], None), 7439).unwrap_err();
        assert!(too_long.contains("too long"), "{too_long}");
    }

    #[test]
    fn ready_only_once_the_nodes_are_counted_and_all_hold_every_image() {
        let seen = Seen {
            pinned: 2,
            missing: 0,
            counted: false,
            desired_nodes: 0,
            ready_nodes: 0,
        };
        // A DaemonSet just made: 0 of 0 is not "every node".
        assert_eq!(readiness(&seen, &[]).1, "Rolling");
        let counted = Seen {
            counted: true,
            ..seen
        };
        assert_eq!(
            readiness(&counted, &[]),
            (true, "AllNodesReady", "0 node(s) hold 2 image(s)".into())
        );
        let rolling = Seen {
            desired_nodes: 3,
            ready_nodes: 2,
            ..counted
        };
        assert_eq!(readiness(&rolling, &[]).2, "2 of 3 nodes hold every image");
        let unresolved = Seen {
            missing: 1,
            desired_nodes: 3,
            ready_nodes: 3,
            ..counted
        };
        assert_eq!(readiness(&unresolved, &[]).1, "Rolling");
        let pull = NodeImageFailure {
            node: Some("n1".into()),
            image: "docker.io/library/redis:7".into(),
            reason: "ImagePullBackOff".into(),
            message: None,
        };
        let (ok, reason, message) = readiness(&counted, std::slice::from_ref(&pull));
        assert!(!ok);
        assert_eq!(reason, "PullFailed");
        assert_eq!(
            message,
            "1 failure(s); first: node n1: docker.io/library/redis:7: ImagePullBackOff"
        );
        let warm = NodeImageFailure {
            node: None,
            message: Some("404".into()),
            ..pull
        };
        assert_eq!(readiness(&counted, &[warm]).1, "WarmFailed");
        assert_eq!(
            readiness(
                &Seen {
                    pinned: 0,
                    ..counted
                },
                &[]
            )
            .1,
            "WarmFailed"
        );
    }

    #[test]
    fn ready_keeps_its_transition_time_while_its_status_holds() {
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let t1 = Timestamp::from_second(1_800_000_100).unwrap();
        let first = ready(&[], false, "Rolling", "0 of 1".into(), t0);
        let still = ready(
            std::slice::from_ref(&first),
            false,
            "PullFailed",
            "x".into(),
            t1,
        );
        assert_eq!(still.last_transition_time, Time(t0));
        let flipped = ready(&[still], true, "AllNodesReady", "1".into(), t1);
        assert_eq!(flipped.last_transition_time, Time(t1));
    }
}
