//! Private images, the controller's half: the pull-token Secret of every namespace whose pods
//! use pull secrets, and the grant of every namespace that pulls a CachedImage with its own
//! credentials, checked by the registry against the upstream and renewed before it expires.
//!
//! The token Secret (`kache-pull`, a `kubernetes.io/dockerconfigjson`) holds the namespace's pull
//! token for `localhost:<proxy port>`; the webhook names it in the pods it rewrites that carry
//! pull secrets, so the kubelet sends it. Tokens are signed under the newest key of the mounted
//! key Secret, read again when it changes: a rotation rewrites every Secret.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kache_wire::pull_token::{self, Keys};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::Mutex;
use tracing::{info, warn};

/// Private-image scoping, as the controller takes part in it.
#[derive(Debug, Clone)]
pub struct Scoping {
    /// The pull-token keys (the mounted key Secret; the registry mounts the same).
    pub keys_dir: PathBuf,
    /// The name of each namespace's token Secret (the webhook names it in pods).
    pub secret_name: String,
    /// A namespace's grant is checked again this often: under the registry's grant TTL, so a
    /// namespace that keeps its credentials never loses its grant.
    pub renew: Duration,
}

impl Scoping {
    /// Scoping with the keys in `keys_dir`, read once now so that a missing or bad key Secret
    /// stops the controller at its start rather than at the first pod.
    pub fn new(
        keys_dir: PathBuf,
        secret_name: String,
        renew: Duration,
    ) -> Result<Self, pull_token::KeyError> {
        Keys::from_dir(&keys_dir)?;
        Ok(Scoping {
            keys_dir,
            secret_name,
            renew,
        })
    }
}

/// How often the key directory is read again.
const KEYS_REREAD: Duration = Duration::from_secs(15);

/// The label of the Secrets the controller writes.
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "kache");

/// Writes the token Secrets; cheap to share.
pub(crate) struct Tokens {
    client: Client,
    scoping: Scoping,
    proxy_port: u16,
    keys: Mutex<Option<(Instant, Arc<Keys>)>>,
    /// The token each namespace's Secret was last written with.
    written: Mutex<HashMap<String, String>>,
}

impl Tokens {
    pub(crate) fn new(client: Client, scoping: Scoping, proxy_port: u16) -> Self {
        Tokens {
            client,
            scoping,
            proxy_port,
            keys: Mutex::new(None),
            written: Mutex::new(HashMap::new()),
        }
    }

    /// The keys, read again when older than [`KEYS_REREAD`]; on a read error the keys held
    /// stay.
    async fn keys(&self) -> Option<Arc<Keys>> {
        let mut held = self.keys.lock().await;
        if let Some((at, k)) = &*held
            && at.elapsed() < KEYS_REREAD
        {
            return Some(k.clone());
        }
        match Keys::from_dir(&self.scoping.keys_dir) {
            Ok(k) => {
                let k = Arc::new(k);
                *held = Some((Instant::now(), k.clone()));
                Some(k)
            }
            Err(e) => {
                warn!(dir = %self.scoping.keys_dir.display(), error = %e, "cannot read the pull-token keys");
                held.as_ref().map(|(_, k)| k.clone())
            }
        }
    }

    /// Makes sure `namespace` holds its token Secret, with the token of the signing key.
    pub(crate) async fn ensure(&self, namespace: &str) {
        let Some(keys) = self.keys().await else {
            return;
        };
        let token = match keys.sign(namespace) {
            Ok(t) => t,
            Err(e) => {
                warn!(%namespace, error = %e, "no pull token for this namespace");
                return;
            }
        };
        if self.written.lock().await.get(namespace) == Some(&token) {
            return;
        }
        match self.write(namespace, &token).await {
            Ok(()) => {
                self.written
                    .lock()
                    .await
                    .insert(namespace.to_owned(), token);
            }
            Err(e) => warn!(%namespace, error = %e, "cannot write the pull-token Secret"),
        }
    }

    /// Signs every Secret written so far again as often as the keys are read (a namespace whose
    /// token did not change costs nothing): after a rotation each one gets the new key's token
    /// without waiting for a pod of its namespace to change. Runs until dropped.
    pub(crate) async fn refresh(self: Arc<Self>) {
        let mut tick = tokio::time::interval(KEYS_REREAD);
        loop {
            tick.tick().await;
            let namespaces: Vec<String> = self.written.lock().await.keys().cloned().collect();
            for ns in namespaces {
                self.ensure(&ns).await;
            }
        }
    }

    async fn write(&self, namespace: &str, token: &str) -> kube::Result<()> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let name = &self.scoping.secret_name;
        let wanted = secret(name, namespace, self.proxy_port, token);
        // A bounded number of rounds: each conflict means someone else wrote in between.
        for _ in 0..5 {
            let result = match api.get_opt(name).await? {
                None => api.create(&PostParams::default(), &wanted).await,
                Some(existing) if existing.data == wanted.data => return Ok(()),
                Some(existing) => {
                    let owned = existing
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(MANAGED_BY.0))
                        .is_some_and(|v| v == MANAGED_BY.1);
                    if !owned {
                        warn!(%namespace, secret = %name, "a Secret of this name is not kache's; left alone");
                        return Ok(());
                    }
                    let mut replaced = wanted.clone();
                    replaced.metadata.resource_version = existing.metadata.resource_version;
                    api.replace(name, &PostParams::default(), &replaced).await
                }
            };
            match result {
                Ok(_) => {
                    info!(%namespace, secret = %name, "pull-token Secret written");
                    return Ok(());
                }
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The token Secret of `namespace`: a docker config for `localhost:<port>` (the address pods'
/// images are rewritten to, and the only one the kubelet matches it with).
pub(crate) fn secret(name: &str, namespace: &str, port: u16, token: &str) -> Secret {
    let user = pull_token::USERNAME;
    let auth =
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}").as_bytes());
    let config = serde_json::json!({
        "auths": {
            format!("localhost:{port}"): {"username": user, "password": token, "auth": auth}
        }
    });
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some([(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned())].into()),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/dockerconfigjson".to_owned()),
        data: Some(
            [(
                ".dockerconfigjson".to_owned(),
                ByteString(config.to_string().into_bytes()),
            )]
            .into(),
        ),
        ..Secret::default()
    }
}

/// When each (CachedImage, namespace) grant was last checked, so that it is checked again only
/// once [`Scoping::renew`] passed (or when the namespace's list of pull secrets changed).
#[derive(Debug, Default)]
pub(crate) struct Checked(Mutex<HashMap<(String, String), (Instant, u64)>>);

impl Checked {
    /// Whether the grant of `namespace` on `image` is due for a check, given a fingerprint of
    /// the pull secrets it names.
    pub(crate) async fn due(
        &self,
        image: &str,
        namespace: &str,
        secrets: u64,
        renew: Duration,
    ) -> bool {
        let held = self.0.lock().await;
        match held.get(&(image.to_owned(), namespace.to_owned())) {
            Some((at, fp)) => *fp != secrets || at.elapsed() >= renew,
            None => true,
        }
    }

    pub(crate) async fn done(&self, image: &str, namespace: &str, secrets: u64) {
        self.0.lock().await.insert(
            (image.to_owned(), namespace.to_owned()),
            (Instant::now(), secrets),
        );
    }
}

/// Has the registry check whether `namespace` may pull `image` with the credentials `secrets`
/// hold for its registry, when that is due (see [`Checked`]). The Secrets are read only then: a
/// reconcile runs on every pod event, and a check not due must cost the API server nothing.
/// `Some(Err(why))` when refused; `None` when not due, or when the registry could not answer
/// (asked again next time; it keeps what it granted).
pub(crate) async fn check_access(
    checked: &Checked,
    client: &Client,
    registry: &crate::RegistryClient,
    renew: Duration,
    (image, namespace): (&str, &str),
    secrets: &[&kache_api::SecretReference],
) -> Option<Result<(), String>> {
    let fingerprint = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        secrets.hash(&mut h);
        h.finish()
    };
    if !checked.due(image, namespace, fingerprint, renew).await {
        return None;
    }
    let configs = crate::images::pull_configs(client, secrets.iter().copied()).await;
    let credentials = crate::decide::credentials_for(image, &configs);
    match registry.grant(image, namespace, credentials).await {
        Ok(g) => {
            checked.done(image, namespace, fingerprint).await;
            tracing::debug!(%image, namespace, granted = g.granted, visibility = g.visibility.as_str(), "access checked");
            Some(if g.granted {
                Ok(())
            } else {
                Err(g.message.unwrap_or_default())
            })
        }
        Err(e) => {
            warn!(%image, namespace, error = %e, "cannot check a namespace's access to an image");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_secret_is_a_docker_config_for_the_proxy() {
        let s = secret("kache-pull", "team-a", 7439, "v1.k1.team-a.MAC");
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
        let data = &s.data.unwrap()[".dockerconfigjson"];
        let config = kache_oci::credentials::DockerConfig::from_json(&data.0).unwrap();
        assert_eq!(
            config.lookup("localhost:7439"),
            Some(kache_oci::credentials::Credentials::Basic {
                username: "kache".into(),
                password: "v1.k1.team-a.MAC".into()
            })
        );
        assert_eq!(
            s.metadata.labels.unwrap()["app.kubernetes.io/managed-by"],
            "kache"
        );
    }
}
