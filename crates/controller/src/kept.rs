//! Tells the registry which images the cluster keeps, so that its garbage collection never
//! removes them and its eviction never touches a pinned one.
//!
//! The list is every CachedImage's source image; an image is pinned while a CachedImage retains
//! it or a live pod uses it. It is sent whole (`PUT /kache/v1/images`), so it is correct after
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
use kache_api::CachedImage;
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
) -> Vec<KeptImage> {
    let mut out: Vec<KeptImage> = images
        .into_iter()
        .map(|ci| {
            let image = ci.spec.source_image.clone();
            let pinned = ci.spec.retain || pods.iter().any(|p| decide::uses(p, &image));
            KeptImage { image, pinned }
        })
        .collect();
    out.sort_by(|a, b| a.image.cmp(&b.image));
    out.dedup_by(|a, b| a.image == b.image);
    out
}

/// Sends the list whenever it changes, until the task is dropped.
pub(crate) async fn run(
    images: Store<CachedImage>,
    pods: Store<Pod>,
    mut pods_ready: tokio::sync::watch::Receiver<bool>,
    registry: RegistryClient,
) {
    if images.wait_until_ready().await.is_err() || pods_ready.wait_for(|r| *r).await.is_err() {
        return;
    }
    let mut sent: Option<(Vec<KeptImage>, tokio::time::Instant)> = None;
    loop {
        let now = kept_images(images.state().iter().map(|c| c.as_ref()), &pods.state());
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
        let kept = kept_images(images.iter(), &pods);
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
}
