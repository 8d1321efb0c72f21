//! Where a cache repository comes from: the upstream registry and the repository on it, typed
//! once from the request and carried so to the upstream's URL.

use std::fmt;

use crate::name::RepoName;
use crate::reference::{
    DOCKER_HUB, DOCKER_HUB_ENDPOINT, ImageReference, ReferenceError, valid_port, valid_registry,
};

/// An upstream registry (`docker.io`, `registry:5000`) and a repository path on it
/// (`library/nginx`): what a cache repository (`docker.io/library/nginx`,
/// `registry_5000/team/app`) stands for.
///
/// ```
/// use kache_oci::{Origin, RepoName};
///
/// let repo: RepoName = "registry_5000/team/app".parse().unwrap();
/// let origin = Origin::of(&repo).unwrap();
/// assert_eq!(origin.registry(), "registry:5000");
/// assert_eq!(origin.path().as_str(), "team/app");
/// assert_eq!(origin.cache_repository(), repo);
/// // A plain repository has none.
/// assert_eq!(Origin::of(&"team/app".parse().unwrap()), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    /// A valid `host[:port]`, lowercase.
    registry: String,
    path: RepoName,
}

impl Origin {
    /// The origin of a cache repository: its first component is the registry host, a port
    /// written `host_port` (`registry_5000/x` → `registry:5000`, `x`). `None` when the first
    /// component cannot be a registry host (`library/nginx`: no `.`, no `_<port>`, not
    /// `localhost`) or nothing follows it: a plain repository, served from the store only.
    pub fn of(repo: &RepoName) -> Option<Origin> {
        let (first, path) = repo.as_str().split_once('/')?;
        let host = match first.rsplit_once('_') {
            Some((host, port)) if valid_port(port) => format!("{host}:{port}"),
            Some(_) => return None,
            None if first.contains('.') || first == "localhost" => first.to_owned(),
            None => return None,
        };
        if !valid_registry(&host) {
            return None;
        }
        Some(Origin {
            registry: host,
            path: path.parse().ok()?,
        })
    }

    /// The origin of `path` on `registry` (`host[:port]`).
    pub fn new(registry: &str, path: RepoName) -> Result<Origin, ReferenceError> {
        let registry = registry.to_ascii_lowercase();
        if !valid_registry(&registry) {
            return Err(ReferenceError::InvalidRegistry(registry));
        }
        Ok(Origin { registry, path })
    }

    /// The origin of an image reference.
    pub fn of_image(image: &ImageReference) -> Origin {
        let path = image
            .repository
            .parse()
            .expect("a parsed image reference names a valid repository");
        Origin {
            registry: image.registry.clone(),
            path,
        }
    }

    /// The registry as references name it, and credentials are keyed by: `docker.io`,
    /// `registry:5000`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository on the registry.
    pub fn path(&self) -> &RepoName {
        &self.path
    }

    /// The host that serves the registry's API: Docker Hub is named `docker.io` but answers at
    /// `registry-1.docker.io`.
    pub fn endpoint(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_ENDPOINT
        } else {
            &self.registry
        }
    }

    /// The cache repository that stands for it: `<host>/<path>`, a port written `host_port`.
    pub fn cache_repository(&self) -> RepoName {
        format!("{}/{}", self.registry.replace(':', "_"), self.path)
            .parse()
            .expect("an origin always names a valid cache repository")
    }
}

/// `registry/path`, as an image reference writes it.
impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(s: &str) -> RepoName {
        s.parse().unwrap()
    }

    #[test]
    fn cache_repositories_split_into_registry_and_path_and_back() {
        for (cache, registry, path) in [
            ("docker.io/library/nginx", "docker.io", "library/nginx"),
            ("registry_5000/x", "registry:5000", "x"),
            ("localhost/a/b", "localhost", "a/b"),
            ("ghcr.io/o/a/b/c", "ghcr.io", "o/a/b/c"),
            (
                "my-reg.example.com_443/team/app",
                "my-reg.example.com:443",
                "team/app",
            ),
        ] {
            let o = Origin::of(&repo(cache)).unwrap_or_else(|| panic!("{cache}"));
            assert_eq!(
                (o.registry(), o.path().as_str()),
                (registry, path),
                "{cache}"
            );
            assert_eq!(o.cache_repository(), repo(cache));
            assert_eq!(Origin::new(registry, repo(path)).unwrap(), o);
        }
        for plain in [
            "library/nginx",
            "team/app",
            "x",
            "registry_99999/x",
            "registry_x/y",
            "docker.io",
            "-bad.io/x",
        ] {
            let Ok(r) = plain.parse::<RepoName>() else {
                continue;
            };
            assert_eq!(Origin::of(&r), None, "{plain}");
        }
        assert!(Origin::new("not a host", repo("x")).is_err());
        assert!(Origin::new("host:port", repo("x")).is_err());
    }

    #[test]
    fn docker_hub_answers_at_its_endpoint() {
        let hub = Origin::of(&repo("docker.io/library/nginx")).unwrap();
        assert_eq!(hub.endpoint(), "registry-1.docker.io");
        assert_eq!(hub.to_string(), "docker.io/library/nginx");
        let other = Origin::of(&repo("registry_5000/x")).unwrap();
        assert_eq!(other.endpoint(), "registry:5000");
        let image: ImageReference = "nginx:1.27".parse().unwrap();
        assert_eq!(Origin::of_image(&image), hub);
    }
}
