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
mod tests;
