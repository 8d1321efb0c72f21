//! Image references as written in pod specs (`nginx`, `ghcr.io/o/a:1`,
//! `registry:5000/x@sha256:...`), normalised the way Docker does, and the cache repository
//! name each one is stored under.

use std::fmt;
use std::str::FromStr;

use crate::digest::{Digest, DigestError};
use crate::name::{MAX_NAME_LEN, Reference, RepoName, Tag, valid_component};

/// The registry of references that name none.
pub const DOCKER_HUB: &str = "docker.io";

/// The host Docker Hub's registry API is served from.
pub const DOCKER_HUB_ENDPOINT: &str = "registry-1.docker.io";

/// Why a string is not an image reference kache accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("image reference is empty")]
    Empty,
    #[error(
        "image reference {0:?} is a 64-character hex string, which names an image ID, not an image"
    )]
    HexIdentifier(String),
    #[error("image name {0:?} is longer than {MAX_NAME_LEN} characters once normalised")]
    NameTooLong(String),
    #[error("registry {0:?} is an IPv6 literal, which kache does not support; use a host name")]
    Ipv6Registry(String),
    #[error("registry {0:?} is not a host name with an optional port (host or host:port)")]
    InvalidRegistry(String),
    #[error("repository {0:?} must be lowercase")]
    Uppercase(String),
    #[error(
        "repository {0:?} does not match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*)*"
    )]
    InvalidRepository(String),
    #[error("tag {0:?} does not match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
    InvalidTag(String),
    #[error("invalid digest in image reference: {0}")]
    InvalidDigest(#[from] DigestError),
}

/// A fully normalised image reference: `docker.io/library/nginx:latest`.
///
/// Parsing follows Docker: a missing registry is `docker.io`, single-component Docker Hub names
/// live under `library/`, and `latest` is assumed only when neither a tag nor a digest is given.
/// A reference with both keeps both; the digest is what gets pulled.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageReference {
    /// Lowercase registry host, with `:port` when one was given (`docker.io`, `registry:5000`).
    pub registry: String,
    /// The repository path on that registry (`library/nginx`).
    pub repository: String,
    pub tag: Option<Tag>,
    pub digest: Option<Digest>,
}

impl ImageReference {
    /// The repository this image is cached under: `<host>/<path>`, a port written `host_port`.
    ///
    /// # Panics
    ///
    /// If the public fields were changed to values that parsing would not have produced.
    pub fn cache_repository(&self) -> RepoName {
        format!("{}/{}", self.registry.replace(':', "_"), self.repository)
            .parse()
            .expect("a parsed image reference always names a valid cache repository")
    }

    /// This image's `:tag` and `@digest`, as written, after another name:
    /// `localhost:7439/docker.io/library/nginx` → `localhost:7439/docker.io/library/nginx:1.27`.
    pub fn renamed(&self, name: &str) -> String {
        let mut out = name.to_owned();
        if let Some(t) = &self.tag {
            out.push(':');
            out.push_str(t.as_str());
        }
        if let Some(d) = &self.digest {
            out.push('@');
            out.push_str(&d.to_string());
        }
        out
    }

    /// What to ask the registry for: the digest when there is one, else the tag.
    pub fn reference(&self) -> Reference {
        match (&self.digest, &self.tag) {
            (Some(d), _) => Reference::Digest(d.clone()),
            (None, Some(t)) => Reference::Tag(t.clone()),
            (None, None) => Reference::Tag(latest()),
        }
    }
}

fn latest() -> Tag {
    "latest".parse().expect("latest is a valid tag")
}

/// The cache repository of a registry-mirror request: containerd asks for `/v2/<repo>/...` with
/// `?ns=<registry>`, which is the image `<registry>/<repo>` (`ns=docker.io`, `library/nginx` →
/// `docker.io/library/nginx`), stored under the same name the webhook's rewrite uses.
pub fn mirror_repository(ns: &str, repo: &RepoName) -> Result<RepoName, ReferenceError> {
    Ok(format!("{ns}/{repo}")
        .parse::<ImageReference>()?
        .cache_repository())
}

/// Whether a first path component names a registry rather than a Docker Hub namespace.
fn looks_like_registry(first: &str) -> bool {
    first.contains(['.', ':', '[']) || first == "localhost"
}

pub(crate) fn valid_port(port: &str) -> bool {
    // u16 parsing would accept a leading '+'.
    !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok()
}

fn valid_label(label: &str) -> bool {
    let b = label.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
}

/// Whether `registry` is `host` or `host:port`, where host is dot-separated labels of letters,
/// digits and inner `-`.
pub fn valid_registry(registry: &str) -> bool {
    let host = match registry.split_once(':') {
        Some((host, port)) => {
            if !valid_port(port) {
                return false;
            }
            host
        }
        None => registry,
    };
    host.split('.').all(valid_label)
}

fn is_hex_identifier(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl FromStr for ImageReference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if is_hex_identifier(s) {
            return Err(ReferenceError::HexIdentifier(s.to_owned()));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => (rest, Some(d.parse::<Digest>()?)),
            None => (s, None),
        };
        // A tag follows the last ':' after the last '/'; a ':' before it is a registry port.
        let last_component = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_component..].rfind(':') {
            Some(i) => {
                let tag = &rest[last_component + i + 1..];
                let tag = tag
                    .parse::<Tag>()
                    .map_err(|_| ReferenceError::InvalidTag(tag.to_owned()))?;
                (&rest[..last_component + i], Some(tag))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if looks_like_registry(first) => (first, path),
            _ => (DOCKER_HUB, name),
        };
        if registry.contains('[') {
            return Err(ReferenceError::Ipv6Registry(registry.to_owned()));
        }
        if !valid_registry(registry) {
            return Err(ReferenceError::InvalidRegistry(registry.to_owned()));
        }
        let registry = match registry.to_ascii_lowercase().as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_owned(),
            r => r.to_owned(),
        };
        if path.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ReferenceError::Uppercase(path.to_owned()));
        }
        if path.is_empty() || !path.split('/').all(valid_component) {
            return Err(ReferenceError::InvalidRepository(path.to_owned()));
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_owned()
        };
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(ReferenceError::NameTooLong(format!(
                "{registry}/{repository}"
            )));
        }
        let tag = match (tag, &digest) {
            (None, None) => Some(latest()),
            (tag, _) => tag,
        };
        Ok(ImageReference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.renamed(&format!("{}/{}", self.registry, self.repository)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn parse(s: &str) -> ImageReference {
        s.parse().unwrap_or_else(|e| panic!("{s:?} refused: {e}"))
    }

    #[test]
    fn normalises_like_docker() {
        let d = format!("sha256:{HEX}");
        let cases: &[(&str, &str, &str)] = &[
            // input, Display, cache repository
            (
                "nginx",
                "docker.io/library/nginx:latest",
                "docker.io/library/nginx",
            ),
            (
                "nginx:1.27",
                "docker.io/library/nginx:1.27",
                "docker.io/library/nginx",
            ),
            (
                "library/nginx",
                "docker.io/library/nginx:latest",
                "docker.io/library/nginx",
            ),
            (
                "docker.io/nginx",
                "docker.io/library/nginx:latest",
                "docker.io/library/nginx",
            ),
            (
                "index.docker.io/nginx",
                "docker.io/library/nginx:latest",
                "docker.io/library/nginx",
            ),
            (
                "registry-1.docker.io/bitnami/redis:7",
                "docker.io/bitnami/redis:7",
                "docker.io/bitnami/redis",
            ),
            (
                "DOCKER.IO/nginx",
                "docker.io/library/nginx:latest",
                "docker.io/library/nginx",
            ),
            (
                "bitnami/redis",
                "docker.io/bitnami/redis:latest",
                "docker.io/bitnami/redis",
            ),
            ("ghcr.io/o/a:1", "ghcr.io/o/a:1", "ghcr.io/o/a"),
            ("GHCR.io/o/a:V1", "ghcr.io/o/a:V1", "ghcr.io/o/a"),
            (
                "quay.io/a/b/c/d",
                "quay.io/a/b/c/d:latest",
                "quay.io/a/b/c/d",
            ),
            ("localhost/x", "localhost/x:latest", "localhost/x"),
            (
                "localhost:5000/x:t",
                "localhost:5000/x:t",
                "localhost_5000/x",
            ),
            (
                "registry:5000/x",
                "registry:5000/x:latest",
                "registry_5000/x",
            ),
            (
                "10.0.0.1:5000/a/b",
                "10.0.0.1:5000/a/b:latest",
                "10.0.0.1_5000/a/b",
            ),
            (
                "my-reg.example.com/a__b/c---d",
                "my-reg.example.com/a__b/c---d:latest",
                "my-reg.example.com/a__b/c---d",
            ),
            // Without a '/', host:port is a Docker Hub name and a tag.
            (
                "localhost:5000",
                "docker.io/library/localhost:5000",
                "docker.io/library/localhost",
            ),
            (
                "localhost",
                "docker.io/library/localhost:latest",
                "docker.io/library/localhost",
            ),
        ];
        for (input, display, cache) in cases {
            let r = parse(input);
            assert_eq!(r.to_string(), *display, "{input}");
            assert_eq!(r.cache_repository().as_str(), *cache, "{input}");
            assert_eq!(parse(display), r, "{input}: Display does not re-parse");
        }
        let r = parse(&format!("registry:5000/x@{d}"));
        assert_eq!(r.cache_repository().as_str(), "registry_5000/x");
        assert_eq!(r.tag, None, "no default tag beside a digest");
        assert_eq!(r.digest.as_ref().map(|d| d.to_string()), Some(d.clone()));
        assert_eq!(r.to_string(), format!("registry:5000/x@{d}"));
        assert!(matches!(r.reference(), Reference::Digest(_)));
        let r = parse(&format!("nginx:1.27@{d}"));
        assert_eq!(r.to_string(), format!("docker.io/library/nginx:1.27@{d}"));
        assert_eq!(r.tag.as_ref().map(Tag::as_str), Some("1.27"));
        assert_eq!(r.reference().to_string(), d, "the digest wins");
        assert_eq!(parse("nginx").reference().to_string(), "latest");
    }

    #[test]
    fn refuses_with_a_reason() {
        use ReferenceError as E;
        let long = format!("ghcr.io/{}", "a".repeat(248));
        type Check = fn(&ReferenceError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| *e == E::Empty),
            (":latest", |e| *e == E::Empty),
            (&format!("@sha256:{HEX}"), |e| *e == E::Empty),
            (HEX, |e| matches!(e, E::HexIdentifier(_))),
            ("Nginx", |e| matches!(e, E::Uppercase(_))),
            ("ghcr.io/Org/app", |e| matches!(e, E::Uppercase(_))),
            ("Foo/bar", |e| matches!(e, E::Uppercase(_))),
            ("[::1]:5000/x", |e| matches!(e, E::Ipv6Registry(_))),
            ("[fe80::1]/x", |e| matches!(e, E::Ipv6Registry(_))),
            ("reg:port/x", |e| matches!(e, E::InvalidRegistry(_))),
            ("reg:70000/x", |e| matches!(e, E::InvalidRegistry(_))),
            ("reg:/x", |e| matches!(e, E::InvalidRegistry(_))),
            ("a..b/x", |e| matches!(e, E::InvalidRegistry(_))),
            ("-a.b/x", |e| matches!(e, E::InvalidRegistry(_))),
            ("reg_1.io/x", |e| matches!(e, E::InvalidRegistry(_))),
            ("ghcr.io/", |e| matches!(e, E::InvalidRepository(_))),
            ("a//b", |e| matches!(e, E::InvalidRepository(_))),
            ("a/../b", |e| matches!(e, E::InvalidRepository(_))),
            ("a b", |e| matches!(e, E::InvalidRepository(_))),
            ("nginx:", |e| matches!(e, E::InvalidTag(_))),
            ("nginx:.x", |e| matches!(e, E::InvalidTag(_))),
            ("nginx@sha256:abc", |e| matches!(e, E::InvalidDigest(_))),
            ("nginx@md5:d41d8cd98f00b204e9800998ecf8427e", |e| {
                matches!(e, E::InvalidDigest(_))
            }),
            (&format!("nginx@sha256:{HEX}@sha256:{HEX}"), |e| {
                matches!(e, E::InvalidDigest(_))
            }),
            (&long, |e| matches!(e, E::NameTooLong(_))),
        ];
        for (input, ok) in cases {
            match input.parse::<ImageReference>() {
                Ok(r) => panic!("{input:?} accepted as {r}"),
                Err(e) => {
                    assert!(ok(&e), "{input:?}: unexpected error {e:?}");
                    assert!(!e.to_string().is_empty());
                }
            }
        }
        // One shorter fits exactly: 7 + 1 + 247 = 255.
        parse(&format!("ghcr.io/{}", "a".repeat(247)));
        // The `library/` prefix counts against the limit.
        assert!(matches!(
            "a".repeat(240).parse::<ImageReference>(),
            Err(ReferenceError::NameTooLong(_))
        ));
    }

    #[test]
    fn cache_repository_round_trip() {
        for (cache, split) in [
            ("registry_5000/x", Some(("registry:5000", "x"))),
            (
                "docker.io/library/nginx",
                Some(("docker.io", "library/nginx")),
            ),
            ("localhost/a/b", Some(("localhost", "a/b"))),
            ("localhost_5000/a", Some(("localhost:5000", "a"))),
            ("10.0.0.1_443/a", Some(("10.0.0.1:443", "a"))),
            ("library/nginx", None),
            ("nginx", None),
            ("a__1/x", None),
            ("reg_x/y", None),
            ("reg_99999/y", None),
            ("a.b_c/x", None),
        ] {
            let repo: RepoName = cache.parse().unwrap();
            let got =
                crate::Origin::of(&repo).map(|o| (o.registry().to_owned(), o.path().to_string()));
            assert_eq!(
                got,
                split.map(|(h, p)| (h.to_owned(), p.to_owned())),
                "{cache}"
            );
        }
        for input in [
            "nginx",
            "ghcr.io/o/a:1",
            "registry:5000/x",
            "localhost:1/a/b",
        ] {
            let r = parse(input);
            assert_eq!(
                crate::Origin::of(&r.cache_repository()),
                Some(crate::Origin::of_image(&r))
            );
        }
    }
}

#[cfg(test)]
mod mirror_tests {
    use super::*;

    #[test]
    fn mirror_requests_map_onto_cache_names() {
        let r = |s: &str| s.parse::<RepoName>().unwrap();
        assert_eq!(
            mirror_repository("docker.io", &r("library/nginx"))
                .unwrap()
                .as_str(),
            "docker.io/library/nginx"
        );
        assert_eq!(
            mirror_repository("registry-1.docker.io", &r("library/nginx"))
                .unwrap()
                .as_str(),
            "docker.io/library/nginx"
        );
        assert_eq!(
            mirror_repository("reg:5000", &r("team/app"))
                .unwrap()
                .as_str(),
            "reg_5000/team/app"
        );
        assert!(mirror_repository("[::1]:5000", &r("x")).is_err());
        assert!(mirror_repository("not a host", &r("x")).is_err());
    }
}
