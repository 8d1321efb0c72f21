//! Tells the registry which images the cluster keeps, so that its garbage collection never
//! removes them and its eviction never touches a pinned one.
//!
//! The list is every CachedImage's source image; an image is pinned while a CachedImage retains
//! it or a live pod uses it. Every image of a NodeImageSet is pinned too, by its tag and by the
//! digest its nodes pull, until the set is deleted. It is sent whole (`PUT /kache/v1/images`), so it is correct after
//! any restart on either side:
//! - the registry keeps the last list in its index, across its own restarts;
//! - the controller (the leader) sends nothing before its caches hold every CachedImage and
//!   every pod (a partial list would unpin images in use), then sends whenever the list changes
//!   and at least every [`RESEND`], so a registry restored from an old volume, or a leader that
//!   changed, converges at once.
//!
//! Between a pod's creation and the next send, its image is not yet pinned; eviction takes least
//! recently pulled images first and skips any image used while it runs, and a pod's image has
//! just been pulled.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kache_api::{CachedImage, NodeImageSet};
use kache_wire::KeptImage;
use kube::runtime::reflector::Store;
use tracing::{debug, warn};

use crate::RegistryClient;
use crate::decide;

/// How often the list is compared with the last one sent.
const CHECK: Duration = Duration::from_secs(5);
/// The list is sent again after this long even if it did not change.
const RESEND: Duration = Duration::from_secs(300);

/// The list as the caches see it now, sorted.
pub(crate) fn kept_images<'a>(
    images: impl IntoIterator<Item = &'a CachedImage>,
    pods: &[std::sync::Arc<Pod>],
    sets: &[std::sync::Arc<NodeImageSet>],
) -> Vec<KeptImage> {
    let mut out: Vec<KeptImage> = images
        .into_iter()
        .map(|ci| {
            let image = ci.spec.source_image.clone();
            let pinned = ci.spec.retain || pods.iter().any(|p| decide::uses(p, &image));
            KeptImage { image, pinned }
        })
        .collect();
    out.extend(
        sets.iter()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .flat_map(|s| set_images(s))
            .map(|image| KeptImage {
                image,
                pinned: true,
            }),
    );
    // Pinned first, so that the dedup keeps the pinned entry of an image listed twice.
    out.sort_by(|a, b| a.image.cmp(&b.image).then(b.pinned.cmp(&a.pinned)));
    out.dedup_by(|a, b| a.image == b.image);
    out
}

/// A set's images, normalised: each by its tag as the spec names it, and by the digest it
/// resolved to (what the nodes pull).
fn set_images(set: &NodeImageSet) -> Vec<String> {
    let mut out: Vec<String> = set
        .spec
        .images
        .iter()
        .filter_map(|i| decide::normalise(i))
        .collect();
    for r in set.status.iter().flat_map(|s| &s.images) {
        let Some(digest) = &r.digest else { continue };
        if let Ok(mut reference) = r.image.parse::<kache_oci::ImageReference>()
            && let Ok(d) = digest.parse()
        {
            reference.tag = None;
            reference.digest = Some(d);
            out.push(reference.to_string());
        }
    }
    out
}

/// Sends the list whenever it changes, until the task is dropped.
pub(crate) async fn run(
    images: Store<CachedImage>,
    pods: Store<Pod>,
    sets: Option<Store<NodeImageSet>>,
    mut pods_ready: tokio::sync::watch::Receiver<bool>,
    registry: RegistryClient,
) {
    if images.wait_until_ready().await.is_err() || pods_ready.wait_for(|r| *r).await.is_err() {
        return;
    }
    if let Some(s) = &sets
        && s.wait_until_ready().await.is_err()
    {
        return;
    }
    let mut sent: Option<(Vec<KeptImage>, tokio::time::Instant)> = None;
    loop {
        let set_state = sets.as_ref().map(|s| s.state()).unwrap_or_default();
        let now = kept_images(
            images.state().iter().map(|c| c.as_ref()),
            &pods.state(),
            &set_state,
        );
        let due = match &sent {
            None => true,
            Some((last, at)) => *last != now || at.elapsed() >= RESEND,
        };
        if due {
            // CachedImages whose source image is not a reference are the reconcile's to report;
            // they are left out rather than refuse the whole list.
            let valid: Vec<KeptImage> = now
                .iter()
                .filter(|k| decide::normalise(&k.image).as_deref() == Some(k.image.as_str()))
                .cloned()
                .collect();
            match registry.set_kept(valid).await {
                Ok(()) => {
                    debug!(
                        images = now.len(),
                        pinned = now.iter().filter(|k| k.pinned).count(),
                        "told the registry which images the cluster keeps"
                    );
                    sent = Some((now, tokio::time::Instant::now()));
                }
                Err(e) => {
                    warn!(error = %e, "cannot tell the registry which images the cluster keeps")
                }
            }
        }
        tokio::time::sleep(CHECK).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kache_api::CachedImageSpec;

    use super::*;

    fn ci(image: &str, retain: bool) -> CachedImage {
        CachedImage::new(
            &kache_api::cached_image_name(image),
            CachedImageSpec {
                source_image: image.into(),
                retain,
                ..CachedImageSpec::default()
            },
        )
    }

    fn running_pod(image_on_proxy: &str) -> Arc<Pod> {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "a", "name": "p", "labels": {"kache.io/managed": "true"}},
            "spec": {"containers": [{"name": "c", "image": image_on_proxy}]},
            "status": {"phase": "Running"}
        }))
        .unwrap();
        Arc::new(p)
    }

    #[test]
    fn pinned_while_retained_or_used_by_a_live_pod() {
        let images = [
            ci("docker.io/library/used:1", false),
            ci("docker.io/library/retained:1", true),
            ci("docker.io/library/idle:1", false),
        ];
        let pods = [running_pod("localhost:7439/docker.io/library/used:1")];
        let kept = kept_images(images.iter(), &pods, &[]);
        let pinned: Vec<(&str, bool)> = kept.iter().map(|k| (k.image.as_str(), k.pinned)).collect();
        assert_eq!(
            pinned,
            [
                ("docker.io/library/idle:1", false),
                ("docker.io/library/retained:1", true),
                ("docker.io/library/used:1", true),
            ]
        );
    }

    #[test]
    fn a_node_image_set_pins_its_tags_and_digests_until_it_is_deleted() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let mut set = NodeImageSet::new(
            "s",
            kache_api::NodeImageSetSpec {
                images: vec!["idle:1".into(), "python:3.12".into()],
                ..Default::default()
            },
        );
        set.status = Some(kache_api::NodeImageSetStatus {
            images: vec![kache_api::ResolvedImage {
                image: "docker.io/library/python:3.12".into(),
                digest: Some(digest.clone()),
            }],
            ..Default::default()
        });
        let images = [ci("docker.io/library/idle:1", false)];
        let kept = kept_images(images.iter(), &[], &[Arc::new(set.clone())]);
        let pinned: Vec<(&str, bool)> = kept.iter().map(|k| (k.image.as_str(), k.pinned)).collect();
        let by_digest = format!("docker.io/library/python@{digest}");
        assert_eq!(
            pinned,
            [
                ("docker.io/library/idle:1", true),
                ("docker.io/library/python:3.12", true),
                (by_digest.as_str(), true),
            ]
        );
        set.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        let kept = kept_images(images.iter(), &[], &[Arc::new(set)]);
        assert_eq!(
            kept,
            [KeptImage {
                image: "docker.io/library/idle:1".into(),
                pinned: false
            }]
        );
    }
}
