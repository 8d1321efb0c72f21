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
use kache_api::policy::ContainerImage;
use serde_json::Value;

use crate::view::PodView;

pub use kache_api::policy::{
    DEFAULT_PROXY_PORT, MAX_WARNING, Pattern, PatternError, PodSkip, Policy, Selector, SkipReason,
};

pub use kache_api::pod_marks::{
    self, ContainerKind, MANAGED_LABEL, ORIGINAL_IMAGE_PREFIX, POLICY_IGNORE, POLICY_LABEL,
    annotation_key, is_dns_label, original_images, parse_annotation_key,
};

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
    /// Containers left alone (none listed when the whole pod was).
    pub skipped: Vec<Skipped>,
    /// What the user should know (returned as admission warnings).
    pub warnings: Vec<String>,
    /// Why the whole pod was left alone (the opt-out label, its namespace, the object
    /// selector): then no container was looked at.
    pub pod_skipped: Option<PodSkip>,
}

/// Computes the patch that points `pod`'s images at the proxy, under `policy` (the pod's
/// namespace is its metadata's).
///
/// Applying the patch and rewriting the result again yields an empty patch.
pub fn rewrite(pod: &Pod, policy: &Policy, scope: Scope<'_>) -> Rewrite {
    let old = match scope {
        Scope::Create => None,
        Scope::EphemeralUpdate { old } => Some(PodView::of(old)),
    };
    rewrite_view(
        &PodView::of(pod),
        pod.metadata.namespace.as_deref(),
        policy,
        old.as_ref(),
    )
}

/// [`rewrite`] of a pod as the review holds it, in `namespace` (the request's); `old` is the pod
/// before an update through `pods/ephemeralcontainers` ([`Scope::EphemeralUpdate`]), `None` for
/// a create.
pub(crate) fn rewrite_view(
    pod: &PodView<'_>,
    namespace: Option<&str>,
    policy: &Policy,
    old: Option<&PodView<'_>>,
) -> Rewrite {
    let mut out = Rewrite::default();
    if let Err(skip) = policy.pod(namespace, |k| pod.label(k)) {
        out.pod_skipped = Some(skip);
        return out;
    }
    let existing_ephemeral: Vec<&str> = match old {
        None => Vec::new(),
        Some(old) => containers(old)
            .filter(|c| c.image.kind == ContainerKind::Ephemeral)
            .map(|c| c.image.name)
            .collect(),
    };
    let mut ops = Vec::new();
    let mut originals = BTreeMap::new();
    for c in containers(pod) {
        if old.is_some()
            && (c.image.kind != ContainerKind::Ephemeral
                || existing_ephemeral.contains(&c.image.name))
        {
            continue;
        }
        match policy.image(&c.image) {
            Ok(taken) => {
                ops.push(PatchOperation::Replace(ReplaceOperation {
                    path: PointerBuf::from_tokens([
                        "spec",
                        c.image.kind.spec_field(),
                        &c.index.to_string(),
                        "image",
                    ]),
                    value: Value::String(taken.proxied),
                }));
                if let (Some(key), Some(image)) =
                    (annotation_key(c.image.kind, c.image.name), c.image.image)
                {
                    originals.insert(key, image.to_owned());
                }
                out.rewritten += 1;
            }
            Err((reason, warning)) => {
                out.skipped.push(Skipped {
                    kind: c.image.kind,
                    container: c.image.name.to_owned(),
                    reason,
                });
                out.warnings.extend(warning);
            }
        }
    }
    if out.rewritten == 0 {
        return out;
    }
    if let (Some(name), Some(secrets)) = (&policy.pull_secret, &pod.pull_secrets)
        && !secrets.is_empty()
        && old.is_none()
        && !secrets
            .iter()
            .any(|r| r.name.as_ref().map(|n| n.as_str()) == Some(name.as_str()))
    {
        ops.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["spec", "imagePullSecrets", "-"]),
            value: serde_json::json!({ "name": name }),
        }));
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

/// One container of any kind: where it is in the spec, and what the policy reads of it.
struct ContainerRef<'a> {
    index: usize,
    image: ContainerImage<'a>,
}

fn containers<'v>(pod: &'v PodView<'_>) -> impl Iterator<Item = ContainerRef<'v>> {
    ContainerKind::ALL.into_iter().flat_map(move |kind| {
        pod.list(kind)
            .iter()
            .enumerate()
            .map(move |(index, c)| ContainerRef {
                index,
                image: ContainerImage {
                    kind,
                    name: c.name.as_ref().map_or("", |n| n.as_str()),
                    image: c.image.as_ref().map(|i| i.as_str()),
                    pull_policy: c.image_pull_policy.as_ref().map(|p| p.as_str()),
                },
            })
    })
}

#[cfg(test)]
mod tests;
