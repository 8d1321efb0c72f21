//! Creating the CachedImages that pods and workloads need, and adding their pull secrets.

use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kache_api::{CachedImage, CachedImageSpec, FINALIZER, SecretReference, cached_image_name};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{debug, warn};

use std::sync::Arc;

use crate::decide;
use crate::tenancy::Tokens;

/// Creates CachedImages (and, with private-image scoping, the pull-token Secret of each
/// namespace that uses pull secrets); cheap to clone.
#[derive(Clone)]
pub struct Ensurer {
    client: Client,
    images: Store<CachedImage>,
    tokens: Option<Arc<Tokens>>,
}

impl std::fmt::Debug for Ensurer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ensurer").finish_non_exhaustive()
    }
}

impl Ensurer {
    pub(crate) fn new(
        client: Client,
        images: Store<CachedImage>,
        tokens: Option<Arc<Tokens>>,
    ) -> Self {
        Ensurer {
            client,
            images,
            tokens,
        }
    }

    /// Handles the pods the pod watch sees, one at a time.
    pub(crate) async fn run_pods(&self, mut rx: UnboundedReceiver<Pod>) {
        while let Some(pod) = rx.recv().await {
            if pod.metadata.deletion_timestamp.is_some() || !decide::pod_is_live(&pod) {
                continue;
            }
            let images = decide::pod_images(&pod);
            if images.is_empty() {
                continue;
            }
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let secrets = decide::pull_secrets(&ns, pod.spec.as_ref());
            let sa = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".to_owned());
            for image in images {
                if let Err(e) = self.ensure(&image, &secrets, Some((&ns, &sa))).await {
                    warn!(%image, pod = %decide::key(Some(&ns), pod.metadata.name.as_deref()),
                        error = %e, "cannot create or update the CachedImage");
                }
            }
        }
    }

    /// Makes sure a CachedImage for `image` exists and names `secrets` (and those of the
    /// ServiceAccount, when one is given) among its pull secrets.
    pub(crate) async fn ensure(
        &self,
        image: &str,
        secrets: &[SecretReference],
        service_account: Option<(&str, &str)>,
    ) -> kube::Result<()> {
        if let Some(tokens) = &self.tokens {
            for ns in secrets.iter().map(|s| s.namespace.as_str()) {
                tokens.ensure(ns).await;
            }
        }
        let name = cached_image_name(image);
        if let Some(existing) = self.images.get(&ObjectRef::new(&name))
            && decide::merge_secrets(&existing.spec.pull_secrets, secrets).is_none()
        {
            return Ok(());
        }
        let mut secrets = secrets.to_vec();
        if let Some((ns, sa)) = service_account {
            secrets.extend(self.service_account_secrets(ns, sa).await);
        }
        let api: Api<CachedImage> = Api::all(self.client.clone());
        // A bounded number of rounds: each conflict means someone else wrote in between.
        for _ in 0..5 {
            match api.get_opt(&name).await? {
                None => {
                    let mut ci = CachedImage::new(
                        &name,
                        CachedImageSpec {
                            source_image: image.to_owned(),
                            pull_secrets: decide::merge_secrets(&[], &secrets).unwrap_or_default(),
                            ..Default::default()
                        },
                    );
                    ci.metadata = ObjectMeta {
                        name: Some(name.clone()),
                        finalizers: Some(vec![FINALIZER.to_owned()]),
                        ..Default::default()
                    };
                    match api.create(&PostParams::default(), &ci).await {
                        Ok(_) => {
                            debug!(%name, %image, "CachedImage created");
                            return Ok(());
                        }
                        Err(kube::Error::Api(s)) if s.code == 409 => continue,
                        Err(e) => return Err(e),
                    }
                }
                Some(existing) => {
                    if existing.spec.source_image != image {
                        // Only a hash collision or a hand-made object gets here.
                        warn!(%name, %image, other = %existing.spec.source_image,
                            "a CachedImage of this name names another image; left alone");
                        return Ok(());
                    }
                    let Some(merged) = decide::merge_secrets(&existing.spec.pull_secrets, &secrets)
                    else {
                        return Ok(());
                    };
                    let patch = serde_json::json!({
                        "metadata": {"resourceVersion": existing.metadata.resource_version},
                        "spec": {"pullSecrets": merged},
                    });
                    match api
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        Ok(_) => return Ok(()),
                        Err(kube::Error::Api(s)) if s.code == 409 => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }

    /// The image pull secrets of a ServiceAccount; none when it cannot be read.
    async fn service_account_secrets(&self, ns: &str, name: &str) -> Vec<SecretReference> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        match api.get_opt(name).await {
            Ok(Some(sa)) => sa
                .image_pull_secrets
                .unwrap_or_default()
                .into_iter()
                .filter(|r| !r.name.is_empty())
                .map(|r| SecretReference {
                    namespace: ns.to_owned(),
                    name: r.name,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => {
                debug!(%ns, %name, error = %e, "cannot read the ServiceAccount");
                Vec::new()
            }
        }
    }
}
