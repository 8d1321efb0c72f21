//! Private images stay private: who may read a cached repository, and how the registry learns it.
//!
//! Every cached repository has a [`Visibility`], learnt from the upstream whenever a manifest
//! is fetched from it ([`Classify`]): `public` when anyone may pull it, `cluster` when it took
//! the chart-wide credentials (the nodes' own, in effect), `private` when it took a namespace's
//! pull secret. A private repository is read only by namespaces holding a grant: the
//! controller asks for one with the namespace's own credentials, the registry checks them with
//! a manifest HEAD upstream and writes the grant for a TTL (the registry is the one writer).
//! Each read names its namespace with a pull token ([`kache_wire::pull_token`]) signed under
//! the keys of [`KeyRing`].
//!
//! Enforcement is one check in the content layer ([`crate::Content`]), on every read of a
//! private repository: manifests, tags, referrers and blobs, HEAD and GET. Public and cluster
//! repositories are read as before, anonymously and without a lookup beyond the visibility.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kache_oci::credentials::Credentials;
use kache_oci::{Origin, Reference, RepoName};
use kache_store::Storage;
use kache_upstream::{Upstream, UpstreamError};
use kache_wire::Visibility;
use kache_wire::pull_token::{KeyError, Keys, Refused};

/// Private-image scoping, as the registry enforces it.
#[derive(Debug)]
pub struct Scoping {
    /// The keys pull tokens are signed under.
    pub keys: KeyRing,
    /// How long a verified grant holds before the namespace's credentials are checked again.
    pub grant_ttl: Duration,
    /// Registries (`host[:port]`) whose images, fetched with the chart-wide credentials, are
    /// private rather than cluster-wide.
    pub private_registries: Vec<String>,
}

impl Scoping {
    /// The default [`Scoping::grant_ttl`].
    pub const GRANT_TTL: Duration = Duration::from_secs(24 * 3600);

    /// Scoping under `keys`, with the default TTL and no registry made private.
    pub fn new(keys: KeyRing) -> Self {
        Scoping {
            keys,
            grant_ttl: Self::GRANT_TTL,
            private_registries: Vec::new(),
        }
    }

    pub(crate) fn classify(&self) -> Classify {
        Classify {
            private_registries: self.private_registries.clone().into(),
        }
    }
}

/// The pull-token keys, re-read from a mounted Secret so that a rotation needs no restart:
/// every 15 s, and at once when a token names a key not held and the directory changed since
/// it was read (a Secret volume's update swaps its `..data` link, which changes the directory).
#[derive(Debug)]
pub struct KeyRing {
    dir: Option<PathBuf>,
    keys: RwLock<Arc<Keys>>,
    /// The directory's modification time when it was last read.
    read_at: std::sync::Mutex<Option<std::time::SystemTime>>,
}

fn modified(dir: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(dir).and_then(|m| m.modified()).ok()
}

impl KeyRing {
    /// Keys that never change.
    pub fn fixed(keys: Keys) -> Self {
        KeyRing {
            dir: None,
            keys: RwLock::new(Arc::new(keys)),
            read_at: std::sync::Mutex::new(None),
        }
    }

    /// The keys in `dir` (one file per key, named by its id), read again by [`Self::reload`].
    pub fn from_dir(dir: PathBuf) -> Result<Self, KeyError> {
        let read_at = modified(&dir);
        let keys = Keys::from_dir(&dir)?;
        Ok(KeyRing {
            dir: Some(dir),
            keys: RwLock::new(Arc::new(keys)),
            read_at: std::sync::Mutex::new(read_at),
        })
    }

    /// Reads the directory again; on an error the keys held stay. Whether the ids changed.
    pub fn reload(&self) -> Result<bool, KeyError> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        let read_at = modified(dir);
        let fresh = Keys::from_dir(dir)?;
        *self.read_at.lock().expect("key lock") = read_at;
        let mut held = self.keys.write().expect("key lock");
        let changed = !fresh.ids().eq(held.ids());
        *held = Arc::new(fresh);
        Ok(changed)
    }

    /// The keys held now.
    pub fn keys(&self) -> Arc<Keys> {
        self.keys.read().expect("key lock").clone()
    }

    /// The caller of a request whose `Authorization` is `value`. A token under a key not held
    /// may be under a key just added: if the directory changed since it was read, the keys are
    /// read again before the token is refused (a stat per such token, never a read).
    pub fn caller(&self, value: Option<&str>) -> Caller {
        let caller = Caller::of(&self.keys(), value);
        let Some(dir) = &self.dir else {
            return caller;
        };
        if !matches!(caller, Caller::Refused(Refused::UnknownKey(_))) {
            return caller;
        }
        let changed = modified(dir) != *self.read_at.lock().expect("key lock");
        if changed && self.reload().is_ok() {
            return Caller::of(&self.keys(), value);
        }
        caller
    }
}

/// Who reads, as the pull token presented says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Caller {
    /// No token (or scoping is off).
    #[default]
    Anonymous,
    /// A token of this namespace, verified.
    Namespace(String),
    /// A token that did not verify.
    Refused(Refused),
}

impl Caller {
    /// The caller of a request whose `Authorization` is `value`.
    pub fn of(keys: &Keys, value: Option<&str>) -> Caller {
        let Some(token) = value.and_then(kache_wire::pull_token::from_authorization) else {
            return Caller::Anonymous;
        };
        if token == "anonymous" {
            return Caller::Anonymous;
        }
        match keys.verify(&token) {
            Ok(ns) => Caller::Namespace(ns.to_owned()),
            Err(e) => Caller::Refused(e),
        }
    }
}

/// What became of one read of a private repository, as `kache_registry_auth_total` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthResult {
    Granted,
    /// No token.
    Anonymous,
    /// A token that did not verify (garbage, an unknown key, another namespace's MAC).
    InvalidToken,
    /// A namespace with no grant on the repository.
    NoGrant,
    /// A namespace whose grant ran out.
    Expired,
}

impl AuthResult {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthResult::Granted => "granted",
            AuthResult::Anonymous => "anonymous",
            AuthResult::InvalidToken => "invalid_token",
            AuthResult::NoGrant => "no_grant",
            AuthResult::Expired => "expired",
        }
    }
}

/// Whether `caller` may read `repo`, whose visibility is private.
pub(crate) fn check_private(
    store: &dyn Storage,
    repo: &RepoName,
    caller: &Caller,
    now: u64,
) -> kache_store::Result<AuthResult> {
    Ok(match caller {
        Caller::Anonymous => AuthResult::Anonymous,
        Caller::Refused(_) => AuthResult::InvalidToken,
        Caller::Namespace(ns) => match store.grant(repo, ns)? {
            Some(g) if g.expires_at > now => AuthResult::Granted,
            Some(_) => AuthResult::Expired,
            None => AuthResult::NoGrant,
        },
    })
}

/// Learns a repository's visibility from the upstream, after a manifest of it was fetched.
#[derive(Debug, Clone)]
pub(crate) struct Classify {
    private_registries: Arc<[String]>,
}

impl Classify {
    /// What the upstream shows `origin` to be, now that `reference` was fetched with `creds`
    /// (a namespace's), or without them (the chart-wide ones, if any); `fetched` says whether
    /// that fetch happened (else the check makes its own). `None` when it cannot tell (the
    /// upstream failed the check): what was recorded stays.
    pub(crate) async fn visibility(
        &self,
        upstream: &Upstream,
        origin: &Origin,
        reference: &Reference,
        creds: Option<&Credentials>,
        fetched: bool,
    ) -> Option<Visibility> {
        let cluster = upstream.has_credentials_for(origin);
        if fetched && creds.is_none() && !cluster {
            // The fetch itself was anonymous.
            return Some(Visibility::Public);
        }
        match upstream.manifest_anonymous(origin, reference).await {
            Ok(_) => return Some(Visibility::Public),
            Err(e) if !refused(&e) => return None,
            Err(_) => {}
        }
        let with_cluster = match creds {
            // Fetched with the chart-wide credentials themselves.
            None if fetched => cluster,
            None if !cluster => false,
            _ if cluster => match upstream.manifest(origin, reference, true, None).await {
                Ok(_) => true,
                Err(e) if !refused(&e) => return None,
                Err(_) => false,
            },
            _ => false,
        };
        let private_registry = self
            .private_registries
            .iter()
            .any(|r| r == origin.registry() || r == origin.endpoint());
        Some(if with_cluster && !private_registry {
            Visibility::Cluster
        } else {
            Visibility::Private
        })
    }
}

/// Whether the upstream said no (rather than failing to answer).
pub(crate) fn refused(e: &UpstreamError) -> bool {
    matches!(
        e,
        UpstreamError::Unauthorized(_) | UpstreamError::Denied(_) | UpstreamError::NotFound(_)
    )
}

/// Records `visibility` for `repo` when it changed.
pub(crate) async fn record(
    store: &dyn Storage,
    repo: &RepoName,
    visibility: Visibility,
) -> kache_store::Result<()> {
    if store.visibility(repo)? != Some(visibility) {
        tracing::info!(%repo, visibility = visibility.as_str(), "repository classified");
        store.set_visibility(repo, visibility).await?;
    }
    Ok(())
}
