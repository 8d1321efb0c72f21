//! The CachedImage reconcile: usage, caching, expiry, and the finalizer that removes the tag.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kache_api::{CachedImage, FINALIZER, UsedBy, cached_image_name};
use kache_oci::credentials::DockerConfig;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event as Finalizing};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::Context;
use crate::decide::{self, Expiry};
use crate::phase;
use crate::tenancy;

/// Why a reconcile did not finish; it is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Registry(String),
    #[error("finalizer: {0}")]
    Finalizer(String),
}

/// The CachedImages a pod's images are named by.
pub(crate) fn images_of_pod(pod: Pod) -> Vec<ObjectRef<CachedImage>> {
    decide::pod_images(&pod)
        .iter()
        .map(|i| ObjectRef::new(&cached_image_name(i)))
        .collect()
}

pub(crate) async fn reconcile(ci: Arc<CachedImage>, ctx: Arc<Context>) -> Result<Action, Error> {
    // No decision about usage before the pod cache holds every pod.
    if ctx
        .pods_ready
        .clone()
        .wait_for(|ready| *ready)
        .await
        .is_err()
    {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let api: Api<CachedImage> = Api::all(ctx.client.clone());
    let result = finalizer::finalizer(&api, FINALIZER, ci, |event| async {
        match event {
            Finalizing::Apply(ci) => apply(&ci, &ctx).await,
            Finalizing::Cleanup(ci) => cleanup(&ci, &ctx).await,
        }
    })
    .await;
    result.map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

pub(crate) fn error_policy(ci: Arc<CachedImage>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error();
    let name = ci.name_any();
    let wait = retry_after(&ctx.failures, &name);
    warn!(%name, error = %error, retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}

/// Counts one more consecutive failure of `name`: how long to wait before its next try.
pub(crate) fn retry_after(
    failures: &Mutex<std::collections::HashMap<String, u32>>,
    name: &str,
) -> Duration {
    // error_policy is synchronous; the count is a best effort when the lock is busy.
    let n = match failures.try_lock() {
        Ok(mut f) => {
            let n = f.entry(name.to_owned()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        }
        Err(_) => 1,
    };
    decide::backoff(n)
}

async fn apply(ci: &CachedImage, ctx: &Context) -> Result<Action, Error> {
    let name = ci.name_any();
    let api: Api<CachedImage> = Api::all(ctx.client.clone());
    let image = ci.spec.source_image.clone();
    let old = ci.status.clone().unwrap_or_default();
    let now = Timestamp::now();

    if decide::normalise(&image).as_deref() != Some(image.as_str()) {
        let (status, note) = phase::invalid(&old, &image);
        if let Some(note) = note {
            publish(ctx, ci, &note).await;
        }
        write_status(&api, &name, &old, status).await?;
        return Ok(Action::await_change());
    }

    let users = decide::users(&image, ctx.pods.state().iter().map(|p| p.as_ref()));
    let used_by = UsedBy::from_pods(users);
    let expiry = decide::expiry(&ci.spec, used_by.pods.len(), now, ctx.config.expiry_delay);
    tracing::debug!(%name, pods = used_by.count, ?expiry, "reconcile");

    let expires_at = match expiry {
        Expiry::Due => {
            if let Some(action) = expire(ci, ctx, &api).await? {
                return Ok(action);
            }
            None
        }
        Expiry::At(t) => Some(t),
        Expiry::Keep => None,
    };
    if ci.spec.expires_at.as_ref().map(|t| t.0) != expires_at {
        let patch = serde_json::json!({"spec": {"expiresAt": expires_at.map(Time)}});
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        if expires_at.is_some() && ci.spec.expires_at.is_none() {
            let note = phase::Note::normal("Expiring", "no pod uses the image");
            publish(ctx, ci, &note).await;
        }
    }

    let seen = phase::Seen {
        now,
        image,
        used_by,
        platforms: decide::platforms(ctx.nodes.state().iter().map(|n| n.as_ref())),
        expires_at,
        resync: ctx.config.resync,
    };
    let warmed = match phase::caching(&old, &seen) {
        phase::Caching::Current => None,
        phase::Caching::Due(announce) => {
            if let Some((status, note)) = announce.map(|b| *b) {
                write_status(&api, &name, &old, status).await?;
                publish(ctx, ci, &note).await;
            }
            Some(warm(ci, ctx, &seen.platforms).await.map(|w| phase::Warmed {
                digest: w.digest.to_string(),
                bytes: w.bytes,
                platforms: w.cached_platforms(&seen.platforms),
            }))
        }
    };
    let failure = match &warmed {
        Some(Err(message)) => Some(message.clone()),
        Some(Ok(_)) => {
            ctx.failures.lock().await.remove(&name);
            None
        }
        None => None,
    };
    let settled = phase::settle(&old, &seen, warmed);
    for note in &settled.notes {
        publish(ctx, ci, note).await;
    }
    write_status(&api, &name, &old, settled.status).await?;
    if let Some(message) = failure {
        return Err(Error::Registry(message));
    }
    let requeue = match &ctx.config.scoping {
        Some(s) => {
            grants(ci, ctx).await;
            settled.requeue.min(s.renew)
        }
        None => settled.requeue,
    };
    Ok(Action::requeue(requeue))
}

/// Deletes an image whose time has come, after asking the API server itself (not the cache)
/// that no pod uses it: a missed watch event must not expire an image in use. `Some` when the
/// reconcile is over.
async fn expire(
    ci: &CachedImage,
    ctx: &Context,
    api: &Api<CachedImage>,
) -> Result<Option<Action>, Error> {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let live = pods
        .list(&ListParams::default().labels(kache_api::pod_marks::MANAGED_LABEL))
        .await?;
    if !decide::users(&ci.spec.source_image, &live.items).is_empty() {
        // The cache was behind: the next pod event reconciles again with the truth.
        return Ok(None);
    }
    info!(name = %ci.name_any(), image = %ci.spec.source_image, "expired: deleting");
    let note = phase::Note::normal("Expired", "unused past spec.expiresAt");
    publish(ctx, ci, &note).await;
    match api.delete(&ci.name_any(), &DeleteParams::default()).await {
        Ok(_) => Ok(Some(Action::await_change())),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Some(Action::await_change())),
        Err(e) => Err(e.into()),
    }
}

async fn cleanup(ci: &CachedImage, ctx: &Context) -> Result<Action, Error> {
    ctx.registry
        .forget(&ci.spec.source_image)
        .await
        .map_err(|e| Error::Registry(e.to_string()))?;
    ctx.failures.lock().await.remove(&ci.name_any());
    info!(name = %ci.name_any(), image = %ci.spec.source_image, "tag removed from the registry");
    Ok(Action::await_change())
}

/// Has the registry check, for each namespace among the pull secrets' (when due: every renewal,
/// or at once when the namespace's list of pull secrets changed), that the
/// namespace's own credentials may pull the image: the registry writes or ends its grant. A
/// namespace refused while the image is private gets a Warning event on the CachedImage.
async fn grants(ci: &CachedImage, ctx: &Context) {
    let Some(scoping) = &ctx.config.scoping else {
        return;
    };
    let image = &ci.spec.source_image;
    let namespaces: std::collections::BTreeSet<&str> = ci
        .spec
        .pull_secrets
        .iter()
        .map(|r| r.namespace.as_str())
        .collect();
    for ns in namespaces {
        let own: Vec<_> = ci
            .spec
            .pull_secrets
            .iter()
            .filter(|r| r.namespace == ns)
            .collect();
        let checked = tenancy::check_access(
            &ctx.checked,
            &ctx.client,
            &ctx.registry,
            scoping.renew,
            (image, ns),
            &own,
        );
        if let Some(Err(why)) = checked.await {
            let note = phase::Note::warning(
                "AccessRefused",
                format!("namespace {ns} may not pull {image}: {why}"),
            );
            publish(ctx, ci, &note).await;
        }
    }
}

/// The docker configs of the pull secrets `refs` name (those that can be read).
pub(crate) async fn pull_configs<'r>(
    client: &kube::Client,
    refs: impl Iterator<Item = &'r kache_api::SecretReference>,
) -> Vec<DockerConfig> {
    let mut configs = Vec::new();
    for r in refs {
        let api: Api<Secret> = Api::namespaced(client.clone(), &r.namespace);
        match api.get_opt(&r.name).await {
            Ok(Some(secret)) => {
                let data = secret.data.unwrap_or_default();
                let bytes = data
                    .get(".dockerconfigjson")
                    .or_else(|| data.get(".dockercfg"));
                match bytes.map(|b| DockerConfig::from_json(&b.0)) {
                    Some(Ok(c)) => configs.push(c),
                    Some(Err(e)) => {
                        warn!(secret = %format!("{}/{}", r.namespace, r.name), error = %e, "pull secret unreadable")
                    }
                    None => {}
                }
            }
            Ok(None) => {}
            Err(e) => {
                warn!(secret = %format!("{}/{}", r.namespace, r.name), error = %e, "cannot read pull secret")
            }
        }
    }
    configs
}

/// Asks the registry to warm the image with the first credentials the pull secrets hold for its
/// registry.
async fn warm(
    ci: &CachedImage,
    ctx: &Context,
    platforms: &[String],
) -> Result<kache_wire::WarmResponse, String> {
    let configs = pull_configs(&ctx.client, ci.spec.pull_secrets.iter()).await;
    let credentials = decide::credentials_for(&ci.spec.source_image, &configs);
    let warmed = ctx
        .registry
        .warm(&ci.spec.source_image, platforms, credentials, false)
        .await
        .map_err(|e| e.to_string())?;
    match warmed.failure() {
        Some(f) => Err(f),
        None => Ok(warmed),
    }
}

/// Writes the status, whole, when it changed: a JSON patch `add` replaces it, so a field that
/// became empty goes without writing nulls (which Kubernetes 1.20 refuses in places).
pub(crate) async fn write_status<K, S>(
    api: &Api<K>,
    name: &str,
    old: &S,
    new: S,
) -> Result<(), kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: PartialEq + serde::Serialize,
{
    if *old == new {
        return Ok(());
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "add", "path": "/status", "value": new}
    ]))
    .expect("a JSON patch");
    if let Err(e) = api
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::<()>::Json(patch.clone()),
        )
        .await
    {
        tracing::debug!(%name, patch = %serde_json::to_string(&patch).unwrap_or_default(), "status write refused");
        return Err(e);
    }
    Ok(())
}

/// Publishes an event about a CachedImage; a refusal is logged, never a failed reconcile.
async fn publish(ctx: &Context, ci: &CachedImage, note: &phase::Note) {
    let reason = note.reason;
    if let Err(e) = ctx
        .events
        .publish(ci.object_ref(&()), note.kind, reason, &note.message)
        .await
    {
        warn!(name = %ci.name_any(), error = %e, reason, "event not recorded");
    }
}
