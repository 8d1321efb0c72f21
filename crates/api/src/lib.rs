//! The `kache.io` Kubernetes API: the cluster-scoped `CachedImage` resource, the marks kache
//! puts on pods ([`pod_marks`]), and which pods and images it takes ([`policy`]): the contracts
//! the webhook and the controller share without importing each other.
//!
//! One CachedImage stands for one source image (a normalised reference such as
//! `docker.io/library/nginx:1.27`). The controller creates them for the images pods and workloads
//! use, or a user creates one by hand to warm an image; the status says what the registry holds
//! and which pods use it. The CRD is generated from these types (`kache crds`), so the YAML in
//! `api/` and in the chart cannot say something the code does not.

mod duration;
mod name;
mod node_images;
mod pattern;
pub mod pod_marks;
pub mod policy;
mod selector;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use duration::parse_duration;
pub use name::{MAX_NAME_LEN, cached_image_name};
pub use node_images::{
    DEFAULT_REFRESH, NODE_IMAGE_SET_FINALIZER, NODE_IMAGE_SET_LABEL, NodeImageFailure,
    NodeImageSet, NodeImageSetSpec, NodeImageSetStatus, ResolvedImage, Rollout,
};

/// The API group of every kache resource.
pub const GROUP: &str = "kache.io";
/// Opt-out annotation on a workload: `"false"` keeps its images from being pre-cached.
pub const PRECACHE_ANNOTATION: &str = "kache.io/precache";
/// The finalizer that removes an image's tag from the registry before its CachedImage goes.
pub const FINALIZER: &str = "kache.io/registry-tag";

/// What the user or the controller wants cached.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "kache.io",
    version = "v1alpha1",
    kind = "CachedImage",
    plural = "cachedimages",
    shortname = "ci",
    category = "kache",
    status = "CachedImageStatus",
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".spec.sourceImage"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Size","type":"integer","jsonPath":".status.size","description":"Bytes stored in the registry"}"#,
    printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.usedBy.count"}"#,
    printcolumn = r#"{"name":"Retain","type":"boolean","jsonPath":".spec.retain"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".spec.expiresAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CachedImageSpec {
    /// The image, normalised: `docker.io/library/nginx:1.27`, or with `@sha256:...`.
    pub source_image: String,
    /// Keep the image even when no pod uses it.
    #[serde(default)]
    pub retain: bool,
    /// When the image goes if no pod uses it by then; set and cleared by the controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// Secrets (`kubernetes.io/dockerconfigjson` or `dockercfg`) that may hold credentials for
    /// the source registry: the image pull secrets of the pods that use it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_secrets: Vec<SecretReference>,
}

/// A Secret in a namespace.
#[derive(
    Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
pub struct SecretReference {
    pub namespace: String,
    pub name: String,
}

/// Where an image is on its way into the cache and out of it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    /// Known, not asked for yet.
    #[default]
    Pending,
    /// The registry is pulling it.
    Caching,
    /// The registry holds the manifest and every blob of the cluster's platforms.
    Cached,
    /// The last attempt failed; `message` says why, and it is retried.
    Failed,
    /// No pod uses it; it goes at `spec.expiresAt`.
    Expiring,
}

impl Phase {
    /// Every phase, in the order an image goes through them.
    pub const ALL: [Phase; 5] = [
        Phase::Pending,
        Phase::Caching,
        Phase::Cached,
        Phase::Failed,
        Phase::Expiring,
    ];

    /// The name as it appears in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Caching => "Caching",
            Phase::Cached => "Cached",
            Phase::Failed => "Failed",
            Phase::Expiring => "Expiring",
        }
    }
}

/// What the registry holds and who uses it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CachedImageStatus {
    /// Pending, Caching, Cached, Failed or Expiring.
    // Not an `Option`: a nullable enum makes a schema Kubernetes 1.20 rejects.
    #[serde(default)]
    pub phase: Phase,
    /// Digest of the manifest (or index) the source image resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Bytes the registry stores for it: manifests and the blobs of the cached platforms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    /// Platforms cached, `os/architecture[/variant]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    /// The pods using the image now, recomputed from the live pods.
    #[serde(default)]
    pub used_by: UsedBy,
    /// When the registry last confirmed the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<Time>,
    /// Why the last attempt failed, or what happens next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `Ready`: true when cached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The pods that use an image.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct UsedBy {
    /// `namespace/name`, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<String>,
    #[serde(default)]
    pub count: i64,
}

impl UsedBy {
    /// Usage from a list of pods (any order, duplicates allowed).
    pub fn from_pods(mut pods: Vec<String>) -> Self {
        pods.sort();
        pods.dedup();
        UsedBy {
            count: pods.len() as i64,
            pods,
        }
    }
}

/// A condition in the Kubernetes style (the shape of `metav1.Condition`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub last_transition_time: Time,
    // Options, not empty strings: Kubernetes 1.20 reads "" here as null and refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The CustomResourceDefinition of every kache resource, as YAML documents (`kache crds`).
pub fn crds_yaml() -> String {
    let mut out =
        String::from("# Generated from the Rust types in api/ by `kache crds`; do not edit.\n");
    for crd in [CachedImage::crd(), NodeImageSet::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd).expect("a CRD serialises to YAML"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crd_is_cluster_scoped_with_a_status_subresource_and_short_name() {
        let crd = CachedImage::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&["ci".to_owned()][..])
        );
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<_> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            ["Image", "Phase", "Size", "Pods", "Retain", "Expires", "Age"]
        );
    }

    #[test]
    fn the_schema_has_no_nullable_enum() {
        // Kubernetes 1.20 refuses `enum: [..., null]` in a CRD.
        let yaml = crds_yaml();
        assert!(!yaml.contains("- null"), "{yaml}");
    }

    #[test]
    fn a_status_without_fields_reads_as_pending_and_unused() {
        let s: CachedImageStatus = serde_json::from_str("{}").unwrap();
        assert_eq!(s.phase, Phase::Pending);
        assert_eq!(s.used_by.count, 0);
    }

    #[test]
    fn an_unknown_phase_is_an_error_not_a_default() {
        let e = serde_json::from_str::<CachedImageStatus>(r#"{"phase":"Lost"}"#);
        assert!(e.is_err());
    }

    #[test]
    fn usage_is_sorted_and_counted_once_per_pod() {
        let u = UsedBy::from_pods(vec!["b/x".into(), "a/y".into(), "b/x".into()]);
        assert_eq!(u.pods, ["a/y", "b/x"]);
        assert_eq!(u.count, 2);
    }
}
