//! Which pods and images kache caches: one [`Policy`], read by two processes. The webhook
//! rewrites what it takes; the controller pre-caches a workload's images only if the webhook
//! would rewrite its pods. Both are given the same flags (the chart renders them once), so that
//! an exclusion (a namespace, a registry, an object selector, the accepted images, the opt-out
//! label) leaves the pod and the cache alike untouched.
//!
//! ```
//! use kache_api::policy::{ContainerImage, PodSkip, Policy};
//! use kache_api::pod_marks::ContainerKind;
//!
//! let policy = Policy::default();
//! let no_labels = |_: &str| None;
//! assert_eq!(policy.pod(Some("kube-system"), no_labels), Err(PodSkip::IgnoredNamespace));
//! assert_eq!(policy.pod(Some("shop"), no_labels), Ok(()));
//! let decided = policy
//!     .image(&ContainerImage { kind: ContainerKind::Container, name: "web", image: Some("nginx:1.27"), pull_policy: None })
//!     .unwrap();
//! assert_eq!(decided.source.to_string(), "docker.io/library/nginx:1.27");
//! assert_eq!(decided.proxied, "localhost:7439/docker.io/library/nginx:1.27");
//! ```

use kache_oci::ImageReference;
use kache_oci::name::MAX_NAME_LEN;

pub use crate::pattern::{Pattern, PatternError};
use crate::pod_marks::{ContainerKind, POLICY_IGNORE, POLICY_LABEL, is_dns_label};
pub use crate::selector::{Selector, SelectorError};

/// The port the node proxy listens on, on every node.
pub const DEFAULT_PROXY_PORT: u16 = 7439;

/// Namespaces left alone unless told otherwise: the cluster's own.
pub const DEFAULT_IGNORED_NAMESPACES: &[&str] = &["kube-system"];

/// Longest warning kept whole: the API server may truncate longer ones.
pub const MAX_WARNING: usize = 256;

/// What kache caches, from the flags the webhook and the controller share.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The node proxy's port on `localhost`.
    pub proxy_port: u16,
    /// Namespaces whose pods are left alone.
    pub ignored_namespaces: Vec<String>,
    /// Only pods whose labels it selects are taken (the webhook configuration's
    /// `objectSelector`, beside the opt-out label).
    pub object_selector: Selector,
    /// Registries whose images are left alone.
    pub ignore_registries: Vec<Pattern>,
    /// When not empty, only images matching one of these are taken.
    pub accept: Vec<Pattern>,
    /// Leave mutable images alone: `imagePullPolicy: Always`, or tag `latest` (or none), unless a
    /// digest pins them.
    pub skip_mutable: bool,
    /// With private-image scoping: the Secret of a namespace's pull token (`kache-pull`),
    /// appended to the pull secrets of every pod rewritten that has any, so that the kubelet
    /// sends the token to `localhost:<port>`. Pods without pull secrets are left as they are:
    /// their images are public or the cluster's.
    pub pull_secret: Option<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            proxy_port: DEFAULT_PROXY_PORT,
            ignored_namespaces: DEFAULT_IGNORED_NAMESPACES
                .iter()
                .map(|n| (*n).to_owned())
                .collect(),
            object_selector: Selector::default(),
            ignore_registries: Vec::new(),
            accept: Vec::new(),
            skip_mutable: false,
            pull_secret: None,
        }
    }
}

/// Why a whole pod (or pod template) is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PodSkip {
    /// It carries `kache.io/image-caching-policy: ignore`.
    OptedOut,
    /// Its namespace is ignored.
    IgnoredNamespace,
    /// The object selector does not select it.
    NotSelected,
}

impl PodSkip {
    /// The reason as a metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OptedOut => "pod_opt_out",
            Self::IgnoredNamespace => "pod_ignored_namespace",
            Self::NotSelected => "pod_not_selected",
        }
    }
}

/// Why an image was left as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// The image already points at the proxy (a second admission).
    AlreadyProxied,
    /// The image is on a loopback registry (`localhost:5000/...`): node-local, nothing to cache.
    LocalRegistry,
    /// The registry is in `--ignore-registry`.
    IgnoredRegistry,
    /// `--accept` is set and no pattern matches.
    NotAccepted,
    /// `imagePullPolicy: Never`: the image must already be on the node.
    PullNever,
    /// `--skip-mutable` and the image is mutable.
    Mutable,
    /// The container has no image (the API server will refuse the pod).
    NoImage,
    /// The container name is not a DNS label (the API server will refuse the pod).
    InvalidContainerName,
    /// The image is not a reference kache can parse. Warned about.
    Unparsable,
    /// The rewritten reference would be longer than references may be. Warned about.
    TooLong,
}

impl SkipReason {
    /// The reason as a metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AlreadyProxied => "already_proxied",
            Self::LocalRegistry => "local_registry",
            Self::IgnoredRegistry => "ignored_registry",
            Self::NotAccepted => "not_accepted",
            Self::PullNever => "pull_never",
            Self::Mutable => "mutable",
            Self::NoImage => "no_image",
            Self::InvalidContainerName => "invalid_container_name",
            Self::Unparsable => "unparsable",
            Self::TooLong => "too_long",
        }
    }
}

/// One container's image, as a pod spec (or a workload's pod template) has it.
#[derive(Debug, Clone, Copy)]
pub struct ContainerImage<'a> {
    pub kind: ContainerKind,
    pub name: &'a str,
    pub image: Option<&'a str>,
    pub pull_policy: Option<&'a str>,
}

/// An image the policy takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    /// The image as the upstream knows it, normalised (`docker.io/library/nginx:1.27`).
    pub source: ImageReference,
    /// What the pod pulls instead: `localhost:<port>/<cache repository>[:tag][@digest]`.
    pub proxied: String,
}

impl Policy {
    /// Whether a pod in `namespace` whose labels `label` looks up is taken at all. `None` for the
    /// namespace when it is unknown (then only its labels decide).
    pub fn pod<'l>(
        &self,
        namespace: Option<&str>,
        label: impl Fn(&str) -> Option<&'l str>,
    ) -> Result<(), PodSkip> {
        if label(POLICY_LABEL) == Some(POLICY_IGNORE) {
            return Err(PodSkip::OptedOut);
        }
        if namespace.is_some_and(|ns| self.ignored_namespaces.iter().any(|i| i == ns)) {
            return Err(PodSkip::IgnoredNamespace);
        }
        if !self.object_selector.matches(label) {
            return Err(PodSkip::NotSelected);
        }
        Ok(())
    }

    /// The image a container pulls through the proxy, or why it is left alone (with a warning
    /// when the user should hear about it).
    pub fn image(&self, c: &ContainerImage<'_>) -> Result<Taken, (SkipReason, Option<String>)> {
        let image = match c.image {
            Some(i) if !i.is_empty() => i,
            _ => return Err((SkipReason::NoImage, None)),
        };
        if on_proxy(image, self.proxy_port) {
            return Err((SkipReason::AlreadyProxied, None));
        }
        if !is_dns_label(c.name) {
            return Err((SkipReason::InvalidContainerName, None));
        }
        if c.pull_policy == Some("Never") {
            return Err((SkipReason::PullNever, None));
        }
        if is_loopback_registry(image) {
            return Err((SkipReason::LocalRegistry, None));
        }
        let reference: ImageReference = image.parse().map_err(|e| {
            (
                SkipReason::Unparsable,
                Some(warning(format!(
                    "kache: {} {:?}: image not cached, left as is: {e}",
                    c.kind, c.name
                ))),
            )
        })?;
        if self.ignore_registries.iter().any(|p| p.matches(&reference)) {
            return Err((SkipReason::IgnoredRegistry, None));
        }
        if !self.accept.is_empty() && !self.accept.iter().any(|p| p.matches(&reference)) {
            return Err((SkipReason::NotAccepted, None));
        }
        if self.skip_mutable && is_mutable(&reference, c.pull_policy) {
            return Err((SkipReason::Mutable, None));
        }
        let name = format!(
            "localhost:{}/{}",
            self.proxy_port,
            reference.cache_repository()
        );
        if name.len() > MAX_NAME_LEN {
            return Err((
                SkipReason::TooLong,
                Some(warning(format!(
                    "kache: {} {:?}: image not cached, left as is: its name through the proxy would be {} characters, over the limit of {MAX_NAME_LEN}",
                    c.kind,
                    c.name,
                    name.len()
                ))),
            ));
        }
        Ok(Taken {
            proxied: reference.renamed(&name),
            source: reference,
        })
    }
}

/// Cuts `w` to [`MAX_WARNING`] bytes (on a character boundary), marking the cut.
fn warning(mut w: String) -> String {
    if w.len() > MAX_WARNING {
        let mut end = MAX_WARNING - '…'.len_utf8();
        while !w.is_char_boundary(end) {
            end -= 1;
        }
        w.truncate(end);
        w.push('…');
    }
    w
}

fn is_mutable(reference: &ImageReference, pull_policy: Option<&str>) -> bool {
    reference.digest.is_none()
        && (pull_policy == Some("Always")
            || reference
                .tag
                .as_ref()
                .is_none_or(|t| t.as_str() == "latest"))
}

/// Whether `image` already points at the proxy on `port` (written either way the node reaches it).
fn on_proxy(image: &str, port: u16) -> bool {
    let port = port.to_string();
    ["localhost", "127.0.0.1", "[::1]"].iter().any(|host| {
        image
            .strip_prefix(host)
            .and_then(|r| r.strip_prefix(':'))
            .and_then(|r| r.strip_prefix(port.as_str()))
            .is_some_and(|r| r.starts_with('/'))
    })
}

/// Whether the first component of `image` names a registry on the node's loopback. The cache
/// would fetch such a name from the registry pod's own loopback, which is not the node's.
fn is_loopback_registry(image: &str) -> bool {
    let Some((first, _)) = image.split_once('/') else {
        return false;
    };
    let host = match first.strip_prefix('[') {
        Some(v6) => return v6.starts_with("::1]"),
        None => first.split(':').next().unwrap_or(first),
    };
    host.eq_ignore_ascii_case("localhost") || host.starts_with("127.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn pod_verdict(
        policy: &Policy,
        ns: Option<&str>,
        pairs: &[(&str, &str)],
    ) -> Result<(), PodSkip> {
        let l: BTreeMap<&str, &str> = pairs.iter().copied().collect();
        policy.pod(ns, |k| l.get(k).copied())
    }

    #[test]
    fn pods_are_left_alone_by_label_namespace_and_selector() {
        let policy = Policy {
            ignored_namespaces: vec!["kube-system".into(), "kache".into()],
            object_selector: Selector::from_json(
                r#"{"matchExpressions":[{"key":"team","operator":"NotIn","values":["infra"]}]}"#,
            )
            .unwrap(),
            ..Policy::default()
        };
        let ignore = (POLICY_LABEL, POLICY_IGNORE);
        type Case<'a> = (
            Option<&'a str>,
            &'a [(&'a str, &'a str)],
            Result<(), PodSkip>,
        );
        let table: &[Case<'_>] = &[
            (Some("shop"), &[], Ok(())),
            (None, &[], Ok(())),
            (Some("shop"), &[("team", "web")], Ok(())),
            (Some("shop"), &[ignore], Err(PodSkip::OptedOut)),
            // The opt-out wins, whatever else holds.
            (
                Some("kache"),
                &[ignore, ("team", "infra")],
                Err(PodSkip::OptedOut),
            ),
            (Some("kache"), &[], Err(PodSkip::IgnoredNamespace)),
            (
                Some("kube-system"),
                &[("team", "web")],
                Err(PodSkip::IgnoredNamespace),
            ),
            (
                Some("shop"),
                &[("team", "infra")],
                Err(PodSkip::NotSelected),
            ),
            (None, &[("team", "infra")], Err(PodSkip::NotSelected)),
            (Some("shop"), &[(POLICY_LABEL, "cache")], Ok(())),
        ];
        for (ns, labels, want) in table {
            assert_eq!(
                pod_verdict(&policy, *ns, labels),
                *want,
                "{ns:?} {labels:?}"
            );
        }
        assert_eq!(
            pod_verdict(&Policy::default(), Some("kube-system"), &[]),
            Err(PodSkip::IgnoredNamespace),
            "kube-system by default"
        );
    }

    fn taken(policy: &Policy, image: &str, pull: Option<&str>) -> Result<String, SkipReason> {
        policy
            .image(&ContainerImage {
                kind: ContainerKind::Container,
                name: "app",
                image: Some(image),
                pull_policy: pull,
            })
            .map(|t| t.source.to_string())
            .map_err(|(r, _)| r)
    }

    #[test]
    fn images_are_taken_or_skipped_with_a_reason() {
        let policy = Policy {
            ignore_registries: vec![Pattern::registry("*.internal").unwrap()],
            accept: vec![
                Pattern::image("docker.io/library/*").unwrap(),
                Pattern::image("*.internal").unwrap(),
                Pattern::image("ghcr.io").unwrap(),
            ],
            skip_mutable: true,
            ..Policy::default()
        };
        use SkipReason::*;
        let table: &[(&str, Option<&str>, Result<&str, SkipReason>)] = &[
            ("nginx:1.27", None, Ok("docker.io/library/nginx:1.27")),
            ("nginx", None, Err(Mutable)),
            ("nginx:1.27", Some("Always"), Err(Mutable)),
            ("nginx:1.27", Some("Never"), Err(PullNever)),
            ("reg.internal/a:1", None, Err(IgnoredRegistry)),
            ("quay.io/a/b:1", None, Err(NotAccepted)),
            ("ghcr.io/o/a:1", None, Ok("ghcr.io/o/a:1")),
            (
                "localhost:7439/docker.io/library/nginx:1",
                None,
                Err(AlreadyProxied),
            ),
            ("localhost:5000/x:1", None, Err(LocalRegistry)),
            ("127.0.0.1:5000/x:1", None, Err(LocalRegistry)),
            ("Not A Reference", None, Err(Unparsable)),
            ("", None, Err(NoImage)),
        ];
        for (image, pull, want) in table {
            assert_eq!(
                taken(&policy, image, *pull),
                want.map(str::to_owned),
                "{image} {pull:?}"
            );
        }
        let bad_name = policy.image(&ContainerImage {
            kind: ContainerKind::Init,
            name: "Bad_Name",
            image: Some("nginx:1"),
            pull_policy: None,
        });
        assert_eq!(bad_name.unwrap_err().0, InvalidContainerName);
    }
}
