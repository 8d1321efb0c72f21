//! What a NodeImageSet becomes on the nodes, and what the nodes say back; pure, so that both can
//! be checked without a cluster.
//!
//! One DaemonSet per set, in kache's namespace. Its pods pull each image by running it as an init
//! container: the first init container (the kache image) writes a static no-op program into an
//! emptyDir, and every image then runs that program, so an image without a shell, built from
//! scratch or with any `USER` runs it the same way. Init containers run one at a time, so the
//! pod's memory is one container's whatever the number of images; its one container is
//! `kache pause`. The kubelet keeps the images of a live pod's finished init containers, so its
//! image GC leaves them alone while the set exists.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kache_api::pod_marks::{POLICY_IGNORE, POLICY_LABEL};
use kache_api::{MAX_NAME_LEN, NODE_IMAGE_SET_LABEL, NodeImageFailure, NodeImageSet};
use kache_oci::ImageReference;
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// Where the DaemonSets go and what they run.
#[derive(Debug, Clone)]
pub struct Holder {
    /// kache's namespace: the DaemonSets and their pods live there.
    pub namespace: String,
    /// The kache image (it writes the no-op program and runs `kache pause`).
    pub image: String,
    /// The pull policy of the kache image.
    pub image_pull_policy: String,
    /// Secrets (in `namespace`) the kubelet needs for the kache image.
    pub image_pull_secrets: Vec<String>,
}

/// The annotation holding the set's full name on the DaemonSet and its pods (a label value is
/// at most 63 characters; a set's name may be longer).
pub(crate) const SET_ANNOTATION: &str = "kache.io/node-image-set";
/// The annotation holding the hash of what the controller last wrote.
pub(crate) const SPEC_HASH_ANNOTATION: &str = "kache.io/spec-hash";
/// The user every holder container runs as: numeric, so that no image needs it in /etc/passwd.
const USER: i64 = 65532;
/// Where the no-op program is.
const NOOP_DIR: &str = "/kache";
const NOOP: &str = "/kache/noop";
/// Where the kache binary is in its image.
const KACHE: &str = "/usr/local/bin/kache";

/// One image of a set, resolved: the spec's image (normalised) and its manifest's digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pinned {
    pub image: String,
    pub digest: String,
}

impl Pinned {
    /// The digest-pinned reference through the node proxy:
    /// `localhost:7439/docker.io/library/nginx@sha256:...`.
    pub(crate) fn proxied(&self, proxy_port: u16) -> Option<String> {
        let r: ImageReference = self.image.parse().ok()?;
        Some(format!("{}@{}", proxied_name(&r, proxy_port)?, self.digest))
    }
}

/// The image's repository through the node proxy (`localhost:7439/docker.io/library/nginx`),
/// or `None` when that name is longer than a reference may be.
pub(crate) fn proxied_name(image: &ImageReference, proxy_port: u16) -> Option<String> {
    let name = format!("localhost:{proxy_port}/{}", image.cache_repository());
    (name.len() <= MAX_NAME_LEN).then_some(name)
}

/// A value fit for a label: the name when it is one, else a prefix and a hash of it.
pub(crate) fn label_value(name: &str) -> String {
    if name.len() <= 63 {
        return name.to_owned();
    }
    let hash = hex::encode(&Sha256::digest(name.as_bytes())[..5]);
    let prefix: String = name.chars().take(52).collect();
    format!("{}-{hash}", prefix.trim_end_matches(['-', '.']))
}

/// The DaemonSet's name: `kache-images-<set>`, shortened with a hash when long, so that pod
/// names made from it stay valid.
pub(crate) fn daemon_set_name(set: &str) -> String {
    let name = format!("kache-images-{set}");
    if name.len() <= 52 {
        return name;
    }
    let hash = hex::encode(&Sha256::digest(set.as_bytes())[..4]);
    let prefix: String = name.chars().take(43).collect();
    format!("{}-{hash}", prefix.trim_end_matches(['-', '.']))
}

/// The DaemonSet of `set`, pulling `pinned` (in the spec's order) through the proxy on
/// `proxy_port`; `pull_secret` is kache's own token Secret, for private images.
pub(crate) fn daemon_set(
    set: &NodeImageSet,
    pinned: &[Pinned],
    holder: &Holder,
    proxy_port: u16,
    pull_secret: Option<&str>,
) -> DaemonSet {
    let set_name = set.metadata.name.clone().unwrap_or_default();
    let label = label_value(&set_name);
    let labels = json!({
        "app.kubernetes.io/name": "kache",
        "app.kubernetes.io/component": "node-images",
        "app.kubernetes.io/managed-by": "kache",
        NODE_IMAGE_SET_LABEL: label,
        // Holder pods already name the proxy; the webhook has nothing to do with them.
        POLICY_LABEL: POLICY_IGNORE,
    });
    let security = json!({
        "runAsUser": USER, "runAsGroup": USER, "runAsNonRoot": true,
        "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]},
    });
    let small = json!({"requests": {"cpu": "1m", "memory": "4Mi"}, "limits": {"memory": "32Mi"}});
    let mount = json!([{"name": "noop", "mountPath": NOOP_DIR, "readOnly": true}]);
    let mut init = vec![json!({
        "name": "noop",
        "image": holder.image,
        "imagePullPolicy": holder.image_pull_policy,
        "command": [KACHE, "prepull", "noop", "--out", NOOP],
        "volumeMounts": [{"name": "noop", "mountPath": NOOP_DIR}],
        "securityContext": security,
        "resources": small,
    })];
    for (i, p) in pinned.iter().enumerate() {
        let Some(image) = p.proxied(proxy_port) else {
            continue;
        };
        init.push(json!({
            "name": format!("image-{i}"),
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "command": [NOOP],
            "volumeMounts": mount,
            "securityContext": security,
            "resources": small,
        }));
    }
    let spec = &set.spec;
    let max_unavailable = spec
        .rollout
        .as_ref()
        .and_then(|r| r.max_unavailable.clone())
        .map(|m| serde_json::to_value(m).expect("an int or a string"))
        .unwrap_or(json!(1));
    let mut pod_spec = json!({
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "terminationGracePeriodSeconds": 5,
        "securityContext": {
            "runAsUser": USER, "runAsGroup": USER, "runAsNonRoot": true,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": init,
        "containers": [{
            "name": "pause",
            "image": holder.image,
            "imagePullPolicy": holder.image_pull_policy,
            "command": [KACHE, "pause"],
            "securityContext": security,
            "resources": small,
        }],
        "volumes": [{"name": "noop", "emptyDir": {"sizeLimit": "1Mi"}}],
    });
    if !spec.node_selector.is_empty() {
        pod_spec["nodeSelector"] = json!(spec.node_selector);
    }
    if !spec.tolerations.is_empty() {
        pod_spec["tolerations"] = json!(spec.tolerations);
    }
    let secrets: Vec<_> = holder
        .image_pull_secrets
        .iter()
        .map(String::as_str)
        .chain(pull_secret)
        .map(|name| json!({"name": name}))
        .collect();
    if !secrets.is_empty() {
        pod_spec["imagePullSecrets"] = json!(secrets);
    }
    let annotations = json!({SET_ANNOTATION: set_name});
    let body = json!({
        "selector": {"matchLabels": {NODE_IMAGE_SET_LABEL: label}},
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": max_unavailable}},
        "template": {
            "metadata": {"labels": labels, "annotations": annotations},
            "spec": pod_spec,
        },
    });
    let hash = hex::encode(&Sha256::digest(body.to_string().as_bytes())[..8]);
    let owner = set.metadata.uid.as_ref().map(|uid| {
        json!([{
            "apiVersion": "kache.io/v1alpha1", "kind": "NodeImageSet",
            "name": set_name, "uid": uid,
            "controller": true, "blockOwnerDeletion": true,
        }])
    });
    let mut metadata = json!({
        "name": daemon_set_name(&set_name),
        "namespace": holder.namespace,
        "labels": labels,
        "annotations": {SET_ANNOTATION: set_name, SPEC_HASH_ANNOTATION: hash},
    });
    if let Some(owner) = owner {
        metadata["ownerReferences"] = owner;
    }
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": metadata,
        "spec": body,
    }))
    .expect("a DaemonSet")
}

/// The hash the controller wrote on a DaemonSet.
pub(crate) fn spec_hash(ds: &DaemonSet) -> Option<&str> {
    ds.metadata
        .annotations
        .as_ref()?
        .get(SPEC_HASH_ANNOTATION)
        .map(String::as_str)
}

/// What the holder pods of one set say.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Nodes {
    /// Nodes whose pod runs the current images and is ready.
    pub ready: BTreeSet<String>,
    /// Images a node could not pull or run, with the kubelet's reason.
    pub failures: Vec<NodeImageFailure>,
}

/// Container states that are on the way, not failures.
const ON_THE_WAY: [&str; 2] = ["PodInitializing", "ContainerCreating"];

/// Reads the holder pods: which nodes hold `want` (the proxied references of the current
/// spec), and what failed where. `images` maps a proxied reference back to the spec's image.
pub(crate) fn read_nodes<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    want: &BTreeSet<String>,
    images: &BTreeMap<String, String>,
) -> Nodes {
    let mut out = Nodes::default();
    for pod in pods {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        let has: BTreeSet<String> = pod
            .spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten())
            .filter(|c| c.name.starts_with("image-"))
            .filter_map(|c| c.image.clone())
            .collect();
        let status = pod.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready && has == *want {
            out.ready.insert(node.clone());
        }
        let statuses = status
            .iter()
            .flat_map(|s| {
                s.init_container_statuses
                    .iter()
                    .flatten()
                    .chain(s.container_statuses.iter().flatten())
            })
            .collect::<Vec<&ContainerStatus>>();
        for c in statuses {
            let Some((reason, message)) = failure(c) else {
                continue;
            };
            let image = images
                .get(&c.image)
                .cloned()
                .unwrap_or_else(|| c.image.clone());
            out.failures.push(NodeImageFailure {
                node: Some(node.clone()),
                image,
                reason,
                message,
            });
        }
    }
    out.failures.sort();
    out.failures.dedup();
    out
}

/// Why a container is stuck, if it is.
fn failure(c: &ContainerStatus) -> Option<(String, Option<String>)> {
    let state = c.state.as_ref()?;
    if let Some(w) = &state.waiting {
        let reason = w.reason.clone().unwrap_or_default();
        if reason.is_empty() || ON_THE_WAY.contains(&reason.as_str()) {
            return None;
        }
        return Some((reason, w.message.clone()));
    }
    if let Some(t) = &state.terminated
        && t.exit_code != 0
    {
        let reason = t.reason.clone().unwrap_or_else(|| "Error".to_owned());
        let message = t
            .message
            .clone()
            .unwrap_or_else(|| format!("exited with code {}", t.exit_code));
        return Some((reason, Some(message)));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use kache_api::{NodeImageSetSpec, Rollout};

    fn set(name: &str, spec: NodeImageSetSpec) -> NodeImageSet {
        let mut s = NodeImageSet::new(name, spec);
        s.metadata.uid = Some("u-1".into());
        s
    }

    fn holder() -> Holder {
        Holder {
            namespace: "kache".into(),
            image: "ghcr.io/kache-io/kache:1.0".into(),
            image_pull_policy: "IfNotPresent".into(),
            image_pull_secrets: vec![],
        }
    }

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn pinned() -> Vec<Pinned> {
        vec![
            Pinned {
                image: "docker.io/library/python:3.12".into(),
                digest: D1.into(),
            },
            Pinned {
                image: "registry.local:5000/team/scratch:v1".into(),
                digest: D2.into(),
            },
        ]
    }

    #[test]
    fn every_image_is_an_init_container_running_the_no_op_by_digest_through_the_proxy() {
        let spec = NodeImageSetSpec {
            images: vec![
                "python:3.12".into(),
                "registry.local:5000/team/scratch:v1".into(),
            ],
            node_selector: [("pool".to_owned(), "gpu".to_owned())].into(),
            tolerations: vec![
                serde_json::from_value(json!({"key": "gpu", "operator": "Exists"})).unwrap(),
            ],
            rollout: Some(Rollout {
                max_unavailable: Some(
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("25%".into()),
                ),
            }),
            ..NodeImageSetSpec::default()
        };
        let with_secret = Holder {
            image_pull_secrets: vec!["ghcr".into()],
            ..holder()
        };
        let ds = daemon_set(
            &set("ml", spec),
            &pinned(),
            &with_secret,
            7439,
            Some("kache-pull"),
        );
        let v = serde_json::to_value(&ds).unwrap();
        assert_eq!(v["metadata"]["name"], "kache-images-ml");
        assert_eq!(v["metadata"]["namespace"], "kache");
        assert_eq!(v["metadata"]["ownerReferences"][0]["kind"], "NodeImageSet");
        let pod = &v["spec"]["template"]["spec"];
        let init = pod["initContainers"].as_array().unwrap();
        let images: Vec<&str> = init.iter().map(|c| c["image"].as_str().unwrap()).collect();
        assert_eq!(
            images,
            [
                "ghcr.io/kache-io/kache:1.0",
                &format!("localhost:7439/docker.io/library/python@{D1}"),
                &format!("localhost:7439/registry.local_5000/team/scratch@{D2}"),
            ]
        );
        assert_eq!(
            init[0]["command"],
            json!([KACHE, "prepull", "noop", "--out", NOOP])
        );
        for c in &init[1..] {
            assert_eq!(c["command"], json!([NOOP]));
            assert_eq!(c["volumeMounts"][0]["readOnly"], true);
        }
        for c in init.iter().chain(pod["containers"].as_array().unwrap()) {
            let sc = &c["securityContext"];
            assert_eq!(sc["runAsUser"], USER, "{c}");
            assert_eq!(sc["runAsGroup"], USER, "{c}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{c}");
            assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{c}");
            assert_eq!(c["resources"]["limits"]["memory"], "32Mi", "{c}");
        }
        assert_eq!(pod["containers"][0]["command"], json!([KACHE, "pause"]));
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        assert_eq!(pod["nodeSelector"], json!({"pool": "gpu"}));
        assert_eq!(pod["tolerations"][0]["key"], "gpu");
        assert_eq!(
            pod["imagePullSecrets"],
            json!([{"name": "ghcr"}, {"name": "kache-pull"}])
        );
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert_eq!(
            v["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
            "25%"
        );
        assert_eq!(
            v["spec"]["template"]["metadata"]["labels"]["kache.io/image-caching-policy"],
            "ignore"
        );
    }

    #[test]
    fn a_moved_tag_changes_the_hash_and_the_same_spec_keeps_it() {
        let spec = NodeImageSetSpec {
            images: vec!["python:3.12".into()],
            ..NodeImageSetSpec::default()
        };
        let s = set("a", spec);
        let one = daemon_set(&s, &pinned()[..1], &holder(), 7439, None);
        let again = daemon_set(&s, &pinned()[..1], &holder(), 7439, None);
        let moved = vec![Pinned {
            image: "docker.io/library/python:3.12".into(),
            digest: D2.into(),
        }];
        let other = daemon_set(&s, &moved, &holder(), 7439, None);
        assert_eq!(spec_hash(&one), spec_hash(&again));
        assert_ne!(spec_hash(&one), spec_hash(&other));
        let v = serde_json::to_value(&one).unwrap();
        assert_eq!(
            v["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
            1
        );
        assert!(
            v["spec"]["template"]["spec"]
                .get("imagePullSecrets")
                .is_none()
        );
    }

    #[test]
    fn long_set_names_make_valid_names_and_labels() {
        let long = "a".repeat(200);
        let name = daemon_set_name(&long);
        assert!(name.len() <= 52, "{name}");
        assert_ne!(name, daemon_set_name(&"a".repeat(201)));
        let label = label_value(&long);
        assert!(label.len() <= 63, "{label}");
        assert_eq!(label_value("short"), "short");
    }

    fn pod(node: &str, images: &[&str], ready: bool, init_statuses: serde_json::Value) -> Pod {
        let init: Vec<_> = images
            .iter()
            .enumerate()
            .map(|(i, im)| json!({"name": format!("image-{i}"), "image": im}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": format!("h-{node}")},
            "spec": {"nodeName": node, "initContainers": init, "containers": [{"name": "pause", "image": "k"}]},
            "status": {
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                "initContainerStatuses": init_statuses,
            },
        }))
        .unwrap()
    }

    #[test]
    fn nodes_are_ready_with_the_current_images_and_failures_name_node_image_and_reason() {
        let a = format!("localhost:7439/docker.io/library/python@{D1}");
        let b = format!("localhost:7439/registry.local_5000/team/scratch@{D2}");
        let want: BTreeSet<String> = [a.clone(), b.clone()].into();
        let images: BTreeMap<String, String> = [
            (a.clone(), "docker.io/library/python:3.12".to_owned()),
            (b.clone(), "registry.local:5000/team/scratch:v1".to_owned()),
        ]
        .into();
        let waiting = |image: &str, reason: &str| {
            json!({"name": "image-1", "image": image, "imageID": "", "ready": false, "restartCount": 0,
                   "state": {"waiting": {"reason": reason, "message": "401 Unauthorized"}}})
        };
        let pods = [
            pod("n1", &[&a, &b], true, json!([])),
            // An old revision, ready but without the current images.
            pod("n2", &[&a], true, json!([])),
            pod(
                "n3",
                &[&a, &b],
                false,
                json!([waiting(&b, "ImagePullBackOff")]),
            ),
            pod(
                "n4",
                &[&a, &b],
                false,
                json!([waiting(&b, "PodInitializing")]),
            ),
        ];
        let nodes = read_nodes(pods.iter(), &want, &images);
        assert_eq!(nodes.ready, ["n1".to_owned()].into());
        assert_eq!(
            nodes.failures,
            [NodeImageFailure {
                node: Some("n3".into()),
                image: "registry.local:5000/team/scratch:v1".into(),
                reason: "ImagePullBackOff".into(),
                message: Some("401 Unauthorized".into()),
            }]
        );
    }

    #[test]
    fn an_image_that_exits_non_zero_is_a_failure() {
        let a = format!("localhost:7439/docker.io/library/python@{D1}");
        let status = json!([{"name": "image-0", "image": a, "imageID": "", "ready": false, "restartCount": 3,
            "state": {"terminated": {"exitCode": 126}}}]);
        let nodes = read_nodes(
            [pod("n1", &[&a], false, status)].iter(),
            &[a.clone()].into(),
            &BTreeMap::new(),
        );
        assert_eq!(nodes.failures[0].reason, "Error");
        assert_eq!(
            nodes.failures[0].message.as_deref(),
            Some("exited with code 126")
        );
        assert_eq!(nodes.failures[0].image, a);
    }
}
