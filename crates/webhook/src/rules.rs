//! The rewrite rules: a Pod and a [`Policy`] in, a JSON patch out. Pure: no I/O, no clock.
//!
//! Every image the policy takes becomes `localhost:<port>/<cache repository>[:tag][@digest]`
//! (`nginx` → `localhost:7439/docker.io/library/nginx:latest`). The pod gets the label
//! `kache.io/managed: "true"` and, per rewritten container, an annotation holding the image as it
//! was written; [`original_images`] reads them back.
//!
//! (the marks and their annotation keys are kache-api's [`pod_marks`]).

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::Pod;
use kache_oci::ImageReference;
use kache_oci::name::MAX_NAME_LEN;
use serde_json::Value;

use crate::view::PodView;

pub use crate::pattern::{Pattern, PatternError};

pub use kache_api::pod_marks::{
    self, ContainerKind, MANAGED_LABEL, ORIGINAL_IMAGE_PREFIX, POLICY_IGNORE, POLICY_LABEL,
    annotation_key, is_dns_label, original_images, parse_annotation_key,
};

/// The port the node proxy listens on, on every node.
pub const DEFAULT_PROXY_PORT: u16 = 7439;

/// What the webhook rewrites, from its flags.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The node proxy's port on `localhost`.
    pub proxy_port: u16,
    /// Registries whose images are left alone.
    pub ignore_registries: Vec<Pattern>,
    /// When not empty, only images matching one of these are rewritten.
    pub accept: Vec<Pattern>,
    /// Leave mutable images alone: `imagePullPolicy: Always`, or tag `latest` (or none), unless a
    /// digest pins them.
    pub skip_mutable: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            proxy_port: DEFAULT_PROXY_PORT,
            ignore_registries: Vec::new(),
            accept: Vec::new(),
            skip_mutable: false,
        }
    }
}

/// Which containers a request may change.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// A pod being created: every container of every kind.
    Create,
    /// An update through `pods/ephemeralcontainers`: only the ephemeral containers that `old`
    /// does not have yet. Existing ones must not change (the API server refuses that), and nothing
    /// else may change through this subresource.
    EphemeralUpdate {
        /// The pod before the update.
        old: &'a Pod,
    },
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

/// A container left as it was, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub kind: ContainerKind,
    pub container: String,
    pub reason: SkipReason,
}

/// What [`rewrite`] decided for one pod.
#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    /// The JSON patch to apply to the pod as the API server sent it; empty when nothing changes.
    pub patch: Patch,
    /// How many images were rewritten.
    pub rewritten: usize,
    /// Containers left alone (none listed when the pod opted out).
    pub skipped: Vec<Skipped>,
    /// What the user should know (returned as admission warnings).
    pub warnings: Vec<String>,
    /// The pod carries `kache.io/image-caching-policy: ignore`: nothing was looked at.
    pub opted_out: bool,
}

/// Computes the patch that points `pod`'s images at the proxy, under `policy`.
///
/// Applying the patch and rewriting the result again yields an empty patch.
pub fn rewrite(pod: &Pod, policy: &Policy, scope: Scope<'_>) -> Rewrite {
    let old = match scope {
        Scope::Create => None,
        Scope::EphemeralUpdate { old } => Some(PodView::of(old)),
    };
    rewrite_view(&PodView::of(pod), policy, old.as_ref())
}

/// [`rewrite`] of a pod as the review holds it; `old` is the pod before an update through
/// `pods/ephemeralcontainers` ([`Scope::EphemeralUpdate`]), `None` for a create.
pub(crate) fn rewrite_view(
    pod: &PodView<'_>,
    policy: &Policy,
    old: Option<&PodView<'_>>,
) -> Rewrite {
    let mut out = Rewrite::default();
    if pod.label(POLICY_LABEL) == Some(POLICY_IGNORE) {
        out.opted_out = true;
        return out;
    }
    let existing_ephemeral: Vec<&str> = match old {
        None => Vec::new(),
        Some(old) => containers(old)
            .filter(|c| c.kind == ContainerKind::Ephemeral)
            .map(|c| c.name)
            .collect(),
    };
    let mut ops = Vec::new();
    let mut originals = BTreeMap::new();
    for c in containers(pod) {
        if old.is_some()
            && (c.kind != ContainerKind::Ephemeral || existing_ephemeral.contains(&c.name))
        {
            continue;
        }
        match decide(&c, policy) {
            Ok(new_image) => {
                ops.push(PatchOperation::Replace(ReplaceOperation {
                    path: PointerBuf::from_tokens([
                        "spec",
                        c.kind.spec_field(),
                        &c.index.to_string(),
                        "image",
                    ]),
                    value: Value::String(new_image),
                }));
                if let (Some(key), Some(image)) = (annotation_key(c.kind, c.name), c.image) {
                    originals.insert(key, image.to_owned());
                }
                out.rewritten += 1;
            }
            Err((reason, warning)) => {
                out.skipped.push(Skipped {
                    kind: c.kind,
                    container: c.name.to_owned(),
                    reason,
                });
                out.warnings.extend(warning);
            }
        }
    }
    if out.rewritten == 0 {
        return out;
    }
    let mut managed = BTreeMap::new();
    if pod.label(MANAGED_LABEL) != Some("true") {
        managed.insert(MANAGED_LABEL.to_owned(), "true".to_owned());
    }
    add_to_map(&mut ops, "labels", pod.labels().is_some(), managed);
    originals.retain(|k, v| pod.annotation(k) != Some(v.as_str()));
    add_to_map(
        &mut ops,
        "annotations",
        pod.annotations().is_some(),
        originals,
    );
    out.patch = Patch(ops);
    out
}

/// Adds `entries` to `metadata.<field>`: key by key when the map exists (`/` in keys escaped as
/// `~1`), as a whole map when it does not (a pointer into a missing map would not apply).
fn add_to_map(
    ops: &mut Vec<PatchOperation>,
    field: &str,
    exists: bool,
    entries: BTreeMap<String, String>,
) {
    if entries.is_empty() {
        return;
    }
    if exists {
        for (k, v) in entries {
            ops.push(PatchOperation::Add(AddOperation {
                path: PointerBuf::from_tokens(["metadata", field, &k]),
                value: Value::String(v),
            }));
        }
    } else {
        let map = entries
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        ops.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["metadata", field]),
            value: Value::Object(map),
        }));
    }
}

/// One container of any kind, with what the rules read from it.
struct ContainerRef<'a> {
    kind: ContainerKind,
    index: usize,
    name: &'a str,
    image: Option<&'a str>,
    pull_policy: Option<&'a str>,
}

fn containers<'v>(pod: &'v PodView<'_>) -> impl Iterator<Item = ContainerRef<'v>> {
    ContainerKind::ALL.into_iter().flat_map(move |kind| {
        pod.list(kind)
            .iter()
            .enumerate()
            .map(move |(index, c)| ContainerRef {
                kind,
                index,
                name: c.name.as_ref().map_or("", |n| n.as_str()),
                image: c.image.as_ref().map(|i| i.as_str()),
                pull_policy: c.image_pull_policy.as_ref().map(|p| p.as_str()),
            })
    })
}

/// The rewritten image, or why not (with a warning when the user should hear about it).
fn decide(c: &ContainerRef<'_>, policy: &Policy) -> Result<String, (SkipReason, Option<String>)> {
    let image = match c.image {
        Some(i) if !i.is_empty() => i,
        _ => return Err((SkipReason::NoImage, None)),
    };
    if on_proxy(image, policy.proxy_port) {
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
    if policy
        .ignore_registries
        .iter()
        .any(|p| p.matches(&reference))
    {
        return Err((SkipReason::IgnoredRegistry, None));
    }
    if !policy.accept.is_empty() && !policy.accept.iter().any(|p| p.matches(&reference)) {
        return Err((SkipReason::NotAccepted, None));
    }
    if policy.skip_mutable && is_mutable(&reference, c.pull_policy) {
        return Err((SkipReason::Mutable, None));
    }
    let name = format!(
        "localhost:{}/{}",
        policy.proxy_port,
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
    Ok(reference.renamed(&name))
}

/// Longest warning kept whole: the API server may truncate longer ones.
const MAX_WARNING: usize = 256;

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
    use k8s_openapi::api::core::v1::{Container, EphemeralContainer, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn pod(images: &[(&str, &str, Option<&str>)]) -> Pod {
        Pod {
            metadata: ObjectMeta::default(),
            spec: Some(PodSpec {
                containers: images
                    .iter()
                    .map(|(name, image, policy)| Container {
                        name: (*name).into(),
                        image: Some((*image).into()),
                        image_pull_policy: policy.map(Into::into),
                        ..Container::default()
                    })
                    .collect(),
                ..PodSpec::default()
            }),
            status: None,
        }
    }

    /// The image of container 0 after applying the patch, or `None` when it is unchanged.
    fn rewritten(image: &str, policy: &Policy) -> Option<String> {
        rewritten_with(image, None, policy)
    }

    fn rewritten_with(image: &str, pull: Option<&str>, policy: &Policy) -> Option<String> {
        let p = pod(&[("app", image, pull)]);
        let r = rewrite(&p, policy, Scope::Create);
        if r.rewritten == 0 {
            assert!(r.patch.0.is_empty());
            return None;
        }
        let mut doc = serde_json::to_value(&p).unwrap();
        json_patch::patch(&mut doc, &r.patch).unwrap();
        Some(doc["spec"]["containers"][0]["image"].as_str()?.to_owned())
    }

    #[test]
    fn rewrites_to_the_proxy() {
        let p = Policy::default();
        let d = format!("sha256:{HEX}");
        let cases = [
            (
                "nginx",
                "localhost:7439/docker.io/library/nginx:latest".to_owned(),
            ),
            (
                "nginx:1.27",
                "localhost:7439/docker.io/library/nginx:1.27".into(),
            ),
            ("ghcr.io/o/a:1", "localhost:7439/ghcr.io/o/a:1".into()),
            (
                &format!("registry:5000/x@{d}"),
                format!("localhost:7439/registry_5000/x@{d}"),
            ),
            (
                &format!("nginx:1.27@{d}"),
                format!("localhost:7439/docker.io/library/nginx:1.27@{d}"),
            ),
            (
                "index.docker.io/bitnami/redis:7",
                "localhost:7439/docker.io/bitnami/redis:7".into(),
            ),
        ];
        for (image, want) in cases {
            assert_eq!(
                rewritten(image, &p).as_deref(),
                Some(want.as_str()),
                "{image}"
            );
        }
        let other_port = Policy {
            proxy_port: 17439,
            ..Policy::default()
        };
        assert_eq!(
            rewritten("nginx", &other_port).as_deref(),
            Some("localhost:17439/docker.io/library/nginx:latest")
        );
    }

    #[test]
    fn leaves_alone() {
        let p = Policy::default();
        for image in [
            "localhost:7439/docker.io/library/nginx:latest",
            "127.0.0.1:7439/ghcr.io/o/a:1",
            "[::1]:7439/ghcr.io/o/a:1",
            "localhost:5000/team/app:1",
            "127.0.0.1:5000/app",
            "localhost/app",
        ] {
            assert_eq!(rewritten(image, &p), None, "{image}");
        }
        assert_eq!(rewritten_with("nginx:1", Some("Never"), &p), None);
        assert!(rewritten_with("nginx:1", Some("IfNotPresent"), &p).is_some());
        // Not the proxy: another port on localhost is a node-local registry, left alone too.
        let r = rewrite(
            &pod(&[("a", "localhost:7440/docker.io/x", None)]),
            &p,
            Scope::Create,
        );
        assert_eq!(r.skipped[0].reason, SkipReason::LocalRegistry);
    }

    #[test]
    fn warns_about_what_it_cannot_rewrite() {
        let p = Policy::default();
        let long = format!("ghcr.io/{}:1", "a".repeat(240));
        let r = rewrite(
            &pod(&[
                ("up", "Nginx", None),
                ("long", &long, None),
                ("ok", "nginx", None),
            ]),
            &p,
            Scope::Create,
        );
        assert_eq!(r.rewritten, 1);
        let reasons: Vec<_> = r.skipped.iter().map(|s| s.reason).collect();
        assert_eq!(reasons, [SkipReason::Unparsable, SkipReason::TooLong]);
        assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
        assert!(r.warnings[0].contains("\"up\"") && r.warnings[0].contains("lowercase"));
        assert!(r.warnings[1].contains("\"long\"") && r.warnings[1].contains("255"));
        let r = rewrite(
            &pod(&[("x", &format!("{}:1", "A".repeat(300)), None)]),
            &p,
            Scope::Create,
        );
        assert!(r.warnings[0].len() <= MAX_WARNING && r.warnings[0].ends_with('…'));
    }

    #[test]
    fn policy_patterns() {
        let with = |ignore: &[&str], accept: &[&str]| Policy {
            ignore_registries: ignore
                .iter()
                .map(|p| Pattern::registry(p).unwrap())
                .collect(),
            accept: accept.iter().map(|p| Pattern::image(p).unwrap()).collect(),
            ..Policy::default()
        };
        let p = with(&["quay.io", "*.internal", "Index.Docker.IO"], &[]);
        assert_eq!(rewritten("quay.io/a/b", &p), None);
        assert_eq!(rewritten("reg.corp.internal:5000/a", &p), None);
        assert_eq!(rewritten("nginx", &p), None, "docker.io aliases normalise");
        assert!(rewritten("ghcr.io/a/b", &p).is_some());
        assert!(
            rewritten("quay.io.evil.com/a", &p).is_some(),
            "globs match whole"
        );

        let p = with(
            &[],
            &[
                "*.example.com",
                "docker.io/library/*",
                "regex:^ghcr\\.io/o/.*:v[0-9]+$",
            ],
        );
        assert!(rewritten("reg.example.com/x", &p).is_some());
        assert!(rewritten("nginx", &p).is_some());
        assert!(rewritten("ghcr.io/o/a:v1", &p).is_some());
        assert_eq!(rewritten("ghcr.io/o/a:latest", &p), None);
        assert_eq!(rewritten("bitnami/redis", &p), None);
        assert_eq!(rewritten("example.com/x", &p), None);

        let r = rewrite(
            &pod(&[("a", "quay.io/x", None)]),
            &with(&[], &["ghcr.io"]),
            Scope::Create,
        );
        assert_eq!(r.skipped[0].reason, SkipReason::NotAccepted);
        assert!(r.warnings.is_empty(), "policy is not a warning");
        assert!(Pattern::image("regex:(").is_err());
    }

    #[test]
    fn skip_mutable() {
        let p = Policy {
            skip_mutable: true,
            ..Policy::default()
        };
        assert_eq!(rewritten("nginx", &p), None);
        assert_eq!(rewritten("nginx:latest", &p), None);
        assert_eq!(rewritten_with("nginx:1.27", Some("Always"), &p), None);
        assert!(rewritten_with("nginx:1.27", Some("IfNotPresent"), &p).is_some());
        assert!(rewritten(&format!("nginx@sha256:{HEX}"), &p).is_some());
        assert!(
            rewritten_with(&format!("nginx:latest@sha256:{HEX}"), Some("Always"), &p).is_some()
        );
        assert!(
            rewritten("nginx", &Policy::default()).is_some(),
            "off by default"
        );
    }

    #[test]
    fn opt_out_label() {
        let mut p = pod(&[("a", "nginx", None)]);
        p.metadata.labels = Some([(POLICY_LABEL.to_owned(), "ignore".to_owned())].into());
        let r = rewrite(&p, &Policy::default(), Scope::Create);
        assert!(r.patch.0.is_empty() && r.warnings.is_empty() && r.skipped.is_empty());
        assert!(r.opted_out);
    }

    #[test]
    fn ephemeral_update_touches_only_new_ephemeral_containers() {
        let mut old = pod(&[("app", "nginx", None)]);
        let e = |name: &str, image: &str| EphemeralContainer {
            name: name.into(),
            image: Some(image.into()),
            ..EphemeralContainer::default()
        };
        old.spec.as_mut().unwrap().ephemeral_containers = Some(vec![e("debug1", "busybox")]);
        let mut new = old.clone();
        new.spec
            .as_mut()
            .unwrap()
            .ephemeral_containers
            .as_mut()
            .unwrap()
            .push(e("debug2", "busybox:1.36"));
        let r = rewrite(
            &new,
            &Policy::default(),
            Scope::EphemeralUpdate { old: &old },
        );
        assert_eq!(r.rewritten, 1);
        let mut doc = serde_json::to_value(&new).unwrap();
        json_patch::patch(&mut doc, &r.patch).unwrap();
        let spec = &doc["spec"];
        assert_eq!(spec["containers"][0]["image"], "nginx");
        assert_eq!(spec["ephemeralContainers"][0]["image"], "busybox");
        assert_eq!(
            spec["ephemeralContainers"][1]["image"],
            "localhost:7439/docker.io/library/busybox:1.36"
        );
        assert_eq!(
            doc["metadata"]["annotations"]["original-image.kache.io/e.debug2"],
            "busybox:1.36"
        );
    }

    #[test]
    fn reads_original_images_back() {
        let p = Policy::default();
        let name63 = "n".repeat(63);
        let mut pd = pod(&[
            ("a", "nginx:1.27", None),
            (&name63, "registry:5000/x:2", None),
            ("keep", "localhost:5000/x", None),
        ]);
        pd.spec.as_mut().unwrap().init_containers = Some(vec![Container {
            name: "a".into(),
            image: Some("busybox".into()),
            ..Container::default()
        }]);
        let r = rewrite(&pd, &p, Scope::Create);
        let mut doc = serde_json::to_value(&pd).unwrap();
        json_patch::patch(&mut doc, &r.patch).unwrap();
        let patched: Pod = serde_json::from_value(doc).unwrap();
        let want = vec![
            (
                ContainerKind::Container,
                "a".to_owned(),
                "nginx:1.27".to_owned(),
            ),
            (
                ContainerKind::Container,
                name63.clone(),
                "registry:5000/x:2".to_owned(),
            ),
            (ContainerKind::Init, "a".to_owned(), "busybox".to_owned()),
        ];
        assert_eq!(original_images(&patched), want);
        // Without annotations, the rewritten references still tell.
        let mut bare = patched.clone();
        bare.metadata.annotations = None;
        assert_eq!(
            original_images(&bare),
            vec![
                (
                    ContainerKind::Container,
                    "a".to_owned(),
                    "docker.io/library/nginx:1.27".to_owned()
                ),
                (
                    ContainerKind::Container,
                    name63,
                    "registry:5000/x:2".to_owned()
                ),
                (
                    ContainerKind::Init,
                    "a".to_owned(),
                    "docker.io/library/busybox:latest".to_owned()
                ),
            ]
        );
    }
}
