//! `NodeImageSet`: a list of images every selected node holds before any pod needs them.
//!
//! The controller warms each image into kache's registry, resolves tags to digests, and runs one
//! DaemonSet per set in kache's namespace whose pods pull every image (digest-pinned, through the
//! node proxy) and then hold them with one small container. The status says, per node and image,
//! what is missing and why.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Condition, SecretReference};

/// The finalizer that removes a set's DaemonSet before the set goes.
pub const NODE_IMAGE_SET_FINALIZER: &str = "kache.io/node-image-set";
/// The label naming the set a DaemonSet and its pods belong to.
pub const NODE_IMAGE_SET_LABEL: &str = "kache.io/node-image-set";
/// How often tags are resolved again when the spec does not say.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(24 * 3600);

/// Images every selected node holds.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "kache.io",
    version = "v1alpha1",
    kind = "NodeImageSet",
    plural = "nodeimagesets",
    shortname = "nis",
    category = "kache",
    status = "NodeImageSetStatus",
    printcolumn = r#"{"name":"Images","type":"integer","jsonPath":".status.imageCount"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.desiredNodes","description":"Nodes the set selects"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyNodes","description":"Nodes that hold every image"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeImageSetSpec {
    /// The images, by tag or digest (`docker.io/library/python:3.12`, `ghcr.io/a/b@sha256:...`).
    pub images: Vec<String>,
    /// Only nodes with these labels hold the images.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the holder pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Secrets with credentials for the images' registries: the controller uses them to warm the
    /// images; they are never mounted on nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_secrets: Vec<SecretReference>,
    /// How often tags are resolved to digests again (`24h`, `30m`); a tag that moved rolls the
    /// new image out at the rollout's pace. Default 24h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<String>,
    /// The pace of a rollout to the nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

/// How fast a changed set reaches the nodes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// Nodes pulling at once, a number or a percentage of the selected nodes (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
}

/// What the nodes hold.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeImageSetStatus {
    /// The spec's generation this status is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// How many images the set names.
    #[serde(default)]
    pub image_count: i64,
    /// Nodes the set selects (the DaemonSet's desired number).
    #[serde(default)]
    pub desired_nodes: i64,
    /// Nodes that hold every image of the current spec.
    #[serde(default)]
    pub ready_nodes: i64,
    /// Each image, with the digest it resolved to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ResolvedImage>,
    /// When tags were last resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<Time>,
    /// What is missing where: an image the registry could not warm (no node), or one a node
    /// could not pull, with the kubelet's reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<NodeImageFailure>,
    /// `Ready`: true when every selected node holds every image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One image of a set and what it resolved to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedImage {
    /// The image as normalised from the spec.
    pub image: String,
    /// The digest of its manifest or index, when resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// An image missing from a node, or from the cache.
#[derive(
    Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct NodeImageFailure {
    /// The node; absent when the image could not be warmed into the cache at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub image: String,
    /// The kubelet's reason (`ErrImagePull`, `ImagePullBackOff`...) or `WarmFailed`.
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl NodeImageSetSpec {
    /// The refresh interval: the spec's, or [`DEFAULT_REFRESH`].
    pub fn refresh_interval(&self) -> Result<Duration, String> {
        match &self.refresh {
            None => Ok(DEFAULT_REFRESH),
            Some(s) => {
                let d = crate::parse_duration(s).map_err(|e| format!("spec.refresh: {e}"))?;
                if d < Duration::from_secs(60) {
                    return Err(format!("spec.refresh: {s:?} is shorter than 1m"));
                }
                Ok(d)
            }
        }
    }
}
