//! The marks kache puts on pods: the webhook writes them, the controller reads them, and
//! neither imports the other. A pod with a rewritten image carries [`MANAGED_LABEL`]; each
//! rewritten container keeps its image as written in an annotation under
//! [`ORIGINAL_IMAGE_PREFIX`]; a pod labelled [`POLICY_LABEL`]`: `[`POLICY_IGNORE`] is left alone.
//!
//! # Annotation keys
//!
//! `original-image.kache.io/<k>.<container>`, where `<k>` is `c` (containers), `i` (init
//! containers) or `e` (ephemeral containers). The name part of a key may hold 63 characters and
//! a container name may too, so `<k>.<container>` only fits names of up to 61 characters. A longer
//! name (62 or 63 characters) keeps its head and packs its last 24 characters (`[a-z0-9-]`, base
//! 37) into 21 base-62 characters behind a second `.`: `c.<head>.<packed>`, as long as the name
//! itself. Container names never hold a `.`, so the two forms cannot meet, and the packing is a
//! bijection, so keys are deterministic, never collide within a pod (names are unique there) and
//! decode back to the container name without looking at the pod. A hash would have needed the pod
//! to decode and would only make collisions unlikely.
//!
//! ```
//! use kache_api::pod_marks::{ContainerKind, annotation_key, parse_annotation_key};
//!
//! let key = annotation_key(ContainerKind::Init, "migrate").unwrap();
//! assert_eq!(key, "original-image.kache.io/i.migrate");
//! assert_eq!(parse_annotation_key(&key), Some((ContainerKind::Init, "migrate".to_owned())));
//! ```

use std::fmt;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use kache_oci::{ImageReference, Origin, RepoName};

/// Label set on every pod with at least one rewritten image; the controller watches these.
pub const MANAGED_LABEL: &str = "kache.io/managed";

/// Pod label that, set to [`POLICY_IGNORE`], leaves the whole pod alone.
pub const POLICY_LABEL: &str = "kache.io/image-caching-policy";

/// The value of [`POLICY_LABEL`] that opts a pod out.
pub const POLICY_IGNORE: &str = "ignore";

/// Prefix of the annotations that keep each container's original image.
pub const ORIGINAL_IMAGE_PREFIX: &str = "original-image.kache.io/";

/// Which list of the pod spec a container is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ContainerKind {
    /// `spec.containers`
    Container,
    /// `spec.initContainers`
    Init,
    /// `spec.ephemeralContainers`
    Ephemeral,
}

impl ContainerKind {
    /// Every kind, in the pod spec's order.
    pub const ALL: [ContainerKind; 3] = [Self::Container, Self::Init, Self::Ephemeral];

    /// The field of the pod spec holding this kind (`initContainers`).
    pub fn spec_field(self) -> &'static str {
        match self {
            Self::Container => "containers",
            Self::Init => "initContainers",
            Self::Ephemeral => "ephemeralContainers",
        }
    }

    fn key_letter(self) -> char {
        match self {
            Self::Container => 'c',
            Self::Init => 'i',
            Self::Ephemeral => 'e',
        }
    }
}

impl fmt::Display for ContainerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Container => "container",
            Self::Init => "init container",
            Self::Ephemeral => "ephemeral container",
        })
    }
}

/// Kubernetes' DNS-1123 label: what container names must be.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Kubernetes' DNS-1123 subdomain: what most object names must be (dot-separated labels, at most
/// 253 characters).
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Longest container name written verbatim after `<k>.` within the 63-character name part.
const VERBATIM_MAX: usize = 61;
/// How many trailing characters of a long name are packed, and into how many.
const PACKED_FROM: usize = 24;
const PACKED_TO: usize = 21;
/// A container name's alphabet, in the order of its base-37 digits.
const NAME_DIGITS: &[u8; 37] = b"0123456789abcdefghijklmnopqrstuvwxyz-";
/// The packed form's alphabet, all allowed anywhere in a key's name part.
const KEY_DIGITS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The annotation key that keeps the original image of container `name` of `kind` (see the
/// module documentation for the scheme). `None` when `name` is not a valid container name.
pub fn annotation_key(kind: ContainerKind, name: &str) -> Option<String> {
    if !is_dns_label(name) {
        return None;
    }
    let mut key = String::with_capacity(ORIGINAL_IMAGE_PREFIX.len() + 2 + name.len());
    key.push_str(ORIGINAL_IMAGE_PREFIX);
    key.push(kind.key_letter());
    key.push('.');
    if name.len() <= VERBATIM_MAX {
        key.push_str(name);
    } else {
        let (head, tail) = name.split_at(name.len() - PACKED_FROM);
        key.push_str(head);
        key.push('.');
        key.push_str(&pack(tail));
    }
    Some(key)
}

/// The container an annotation key of [`annotation_key`] names; `None` for any other key.
pub fn parse_annotation_key(key: &str) -> Option<(ContainerKind, String)> {
    let rest = key.strip_prefix(ORIGINAL_IMAGE_PREFIX)?;
    let (letter, rest) = rest.split_once('.')?;
    let kind = ContainerKind::ALL
        .into_iter()
        .find(|k| letter.len() == 1 && letter.starts_with(k.key_letter()))?;
    let name = match rest.split_once('.') {
        None => rest.to_owned(),
        Some((head, packed)) => format!("{head}{}", unpack(packed)?),
    };
    // Only the canonical key of a name decodes to it: no two keys name one container.
    (annotation_key(kind, &name).as_deref() == Some(key)).then_some((kind, name))
}

/// Base 37 (container name characters) to fixed-width base 62. 37^24 < 62^21 < 2^128.
fn pack(tail: &str) -> String {
    let mut n: u128 = 0;
    for b in tail.bytes() {
        let d = NAME_DIGITS.iter().position(|&x| x == b).unwrap_or(0);
        n = n * 37 + d as u128;
    }
    let mut out = [0u8; PACKED_TO];
    for slot in out.iter_mut().rev() {
        *slot = KEY_DIGITS[(n % 62) as usize];
        n /= 62;
    }
    out.iter().map(|&b| b as char).collect()
}

fn unpack(packed: &str) -> Option<String> {
    if packed.len() != PACKED_TO {
        return None;
    }
    let mut n: u128 = 0;
    for b in packed.bytes() {
        let d = KEY_DIGITS.iter().position(|&x| x == b)?;
        n = n.checked_mul(62)?.checked_add(d as u128)?;
    }
    let mut out = [0u8; PACKED_FROM];
    for slot in out.iter_mut().rev() {
        *slot = NAME_DIGITS[(n % 37) as usize];
        n /= 37;
    }
    // A remainder means the packed value exceeds any 24-character name.
    (n == 0).then(|| out.iter().map(|&b| b as char).collect())
}

/// The original image of every container now pulled through a kache proxy, in pod order:
/// `(kind, container name, image)`.
///
/// The image is the annotation's (as written in the pod spec before the rewrite). Without an
/// annotation (the API server keeps only `spec.ephemeralContainers` of an update through
/// `pods/ephemeralcontainers`, so metadata added there is dropped), it is decoded from the
/// rewritten reference, normalised (`docker.io/library/nginx:1.27`). Containers whose image is
/// not on a proxy (`localhost:<port>/<cache repository>`, or `127.0.0.1:<port>/...`) are not
/// listed, whatever the annotations say.
pub fn original_images(pod: &Pod) -> Vec<(ContainerKind, String, String)> {
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    let annotations = pod.metadata.annotations.as_ref();
    containers(spec)
        .filter_map(|(kind, name, image)| {
            let upstream = upstream_of_proxied(image?)?;
            let recorded = annotation_key(kind, name)
                .and_then(|k| annotations?.get(&k))
                .cloned();
            Some((kind, name.to_owned(), recorded.unwrap_or(upstream)))
        })
        .collect()
}

/// Every container of a pod spec as `(kind, name, image)`, in the spec's order.
fn containers(spec: &PodSpec) -> impl Iterator<Item = (ContainerKind, &str, Option<&str>)> {
    fn plain(
        kind: ContainerKind,
        list: &[Container],
    ) -> impl Iterator<Item = (ContainerKind, &str, Option<&str>)> {
        list.iter()
            .map(move |c| (kind, c.name.as_str(), c.image.as_deref()))
    }
    let ephemeral = spec.ephemeral_containers.iter().flatten().map(|c| {
        (
            ContainerKind::Ephemeral,
            c.name.as_str(),
            c.image.as_deref(),
        )
    });
    plain(ContainerKind::Container, &spec.containers)
        .chain(plain(
            ContainerKind::Init,
            spec.init_containers.as_deref().unwrap_or_default(),
        ))
        .chain(ephemeral)
}

/// `localhost:7439/registry_5000/x:1` → `registry:5000/x:1`; `None` unless `image` is a proxy
/// reference (any port) naming a cache repository.
fn upstream_of_proxied(image: &str) -> Option<String> {
    let r: ImageReference = image.parse().ok()?;
    let (host, port) = r.registry.split_once(':')?;
    if !(host == "localhost" || host == "127.0.0.1") || port.is_empty() {
        return None;
    }
    let repo: RepoName = r.repository.parse().ok()?;
    Some(r.renamed(&Origin::of(&repo)?.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::EphemeralContainer;
    use regex::Regex;

    #[test]
    fn annotation_keys() {
        let n61 = "a".repeat(61);
        let n62 = format!("{}-{}", "x".repeat(30), "9".repeat(31));
        let n63 = format!("z{}", "-".repeat(61)) + "0";
        assert_eq!(
            annotation_key(ContainerKind::Container, "app").as_deref(),
            Some("original-image.kache.io/c.app")
        );
        assert_eq!(
            annotation_key(ContainerKind::Init, &n61),
            Some(format!("original-image.kache.io/i.{n61}"))
        );
        assert_eq!(annotation_key(ContainerKind::Container, "Bad_Name"), None);
        assert_eq!(
            annotation_key(ContainerKind::Container, &"a".repeat(64)),
            None
        );
        let qualified_name = Regex::new("^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$").unwrap();
        let mut seen = std::collections::HashSet::new();
        for name in [
            "a",
            "app",
            "0",
            &n61,
            &n62,
            &n63,
            &"9".repeat(63),
            &"-".repeat(61),
        ] {
            for kind in ContainerKind::ALL {
                let Some(key) = annotation_key(kind, name) else {
                    assert!(!is_dns_label(name));
                    continue;
                };
                let part = key.strip_prefix(ORIGINAL_IMAGE_PREFIX).unwrap();
                assert!(part.len() <= 63, "{part}");
                assert!(qualified_name.is_match(part), "{part}");
                assert_eq!(
                    parse_annotation_key(&key),
                    Some((kind, name.to_owned())),
                    "{key}"
                );
                assert!(seen.insert(key), "keys are unique");
            }
        }
        // 37^24 fits in 21 base-62 digits, and the extremes survive the round trip.
        assert!(37u128.pow(PACKED_FROM as u32) <= 62u128.pow(PACKED_TO as u32));
        assert_eq!(unpack(&pack(&"-".repeat(24))).unwrap(), "-".repeat(24));
        assert_eq!(unpack(&pack(&"0".repeat(24))).unwrap(), "0".repeat(24));
        // Two long names differing in one packed character get different keys.
        let a = format!("{}a", "b".repeat(62));
        let b = format!("{}c", "b".repeat(62));
        assert_ne!(
            annotation_key(ContainerKind::Container, &a),
            annotation_key(ContainerKind::Container, &b)
        );
        for bad in [
            "original-image.kache.io/x.app",
            "original-image.kache.io/c.",
            "original-image.kache.io/c.App",
            "original-image.kache.io/c.aa.zzzzzzzzzzzzzzzzzzzzz",
            "original-image.kache.io/c.aa.000000000000000000000",
            "other.io/c.app",
            "original-image.kache.io/cc.app",
        ] {
            assert_eq!(parse_annotation_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn original_images_come_from_annotations_or_the_rewritten_reference() {
        let container = |name: &str, image: &str| Container {
            name: name.into(),
            image: Some(image.into()),
            ..Container::default()
        };
        let mut pod = Pod {
            spec: Some(PodSpec {
                containers: vec![
                    container("app", "localhost:7439/docker.io/library/nginx:1.27"),
                    container("plain", "nginx:1.27"),
                    container("local", "localhost:5000/x:1"),
                ],
                init_containers: Some(vec![container(
                    "init",
                    "127.0.0.1:7439/registry_5000/tools@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                )]),
                ephemeral_containers: Some(vec![EphemeralContainer {
                    name: "debug".into(),
                    image: Some("localhost:7439/ghcr.io/o/dbg:2".into()),
                    ..EphemeralContainer::default()
                }]),
                ..PodSpec::default()
            }),
            ..Pod::default()
        };
        let decoded = vec![
            (
                ContainerKind::Container,
                "app".to_owned(),
                "docker.io/library/nginx:1.27".to_owned(),
            ),
            (
                ContainerKind::Init,
                "init".to_owned(),
                "registry:5000/tools@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".to_owned(),
            ),
            (
                ContainerKind::Ephemeral,
                "debug".to_owned(),
                "ghcr.io/o/dbg:2".to_owned(),
            ),
        ];
        assert_eq!(original_images(&pod), decoded);
        // An annotation keeps the image as written; one for a container not on a proxy is
        // ignored.
        pod.metadata.annotations = Some(
            [
                (
                    annotation_key(ContainerKind::Container, "app").unwrap(),
                    "nginx:1.27",
                ),
                (
                    annotation_key(ContainerKind::Container, "plain").unwrap(),
                    "lie:1",
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k, v.to_owned()))
            .collect(),
        );
        let mut recorded = decoded;
        recorded[0].2 = "nginx:1.27".to_owned();
        assert_eq!(original_images(&pod), recorded);
        assert!(original_images(&Pod::default()).is_empty());
    }
}
