//! What a NodeImageSet becomes on the nodes, and what the nodes say back; pure, so that both can
//! be checked without a cluster.
//!
//! A set's images are split into a few lanes, each one DaemonSet in kache's namespace. Its pods
//! pull each image by running it as an init container: the first init container (the kache
//! image) writes a static no-op program into an emptyDir, and every image then runs that program,
//! so an image without a shell, built from scratch or with any `USER` runs it the same way. Init
//! containers run one at a time, so a pod's memory is one container's whatever the number of
//! images; its one container runs `hold`, the no-op's twin that waits to be stopped (a few
//! pages). The kubelet keeps the images of a live pod's finished init containers, so its image
//! GC leaves them alone while the set exists.
//!
//! Why lanes: the kubelet starts a pod's next init container only once it has seen the previous
//! one exit, at its next look at the runtime (once a second), so one pod takes about a second per
//! image. Pods sync in parallel: a few lanes cut the time to the longest lane's, for one small
//! container each.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodSpec};
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
    /// The kache image (it writes the pod's programs).
    pub image: String,
    /// The pull policy of the kache image.
    pub image_pull_policy: String,
    /// Secrets (in `namespace`) the kubelet needs for the kache image.
    pub image_pull_secrets: Vec<String>,
}

/// The annotation holding the set's full name on the DaemonSet and its pods (a label value is
/// at most 63 characters; a set's name may be longer).
pub(crate) const SET_ANNOTATION: &str = "kache.io/node-image-set";
/// The label with a holder DaemonSet's (and its pods') lane number.
pub(crate) const LANE_LABEL: &str = "kache.io/lane";
/// A set gets one more lane for every this many images...
const LANE_IMAGES: usize = 4;
/// ...up to this many: each lane is a pod on every selected node.
pub(crate) const MAX_LANES: usize = 5;
/// The annotation holding the hash of what the controller last wrote.
pub(crate) const SPEC_HASH_ANNOTATION: &str = "kache.io/spec-hash";
/// The user every holder container runs as: numeric, so that no image needs it in /etc/passwd.
const USER: i64 = 65532;
/// Where the pod's programs are: the no-op every image runs, and the hold its one container runs.
const NOOP_DIR: &str = "/kache";
const NOOP: &str = "/kache/noop";
const HOLD: &str = "/kache/hold";
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

/// The name of lane `lane`'s DaemonSet: `kache-images-<set>-<lane>`, the set's name shortened
/// with a hash when long, so that pod names made from it stay valid.
pub(crate) fn daemon_set_name(set: &str, lane: usize) -> String {
    let name = format!("kache-images-{set}");
    if name.len() <= 50 {
        return format!("{name}-{lane}");
    }
    let hash = hex::encode(&Sha256::digest(set.as_bytes())[..4]);
    let prefix: String = name.chars().take(41).collect();
    format!("{}-{hash}-{lane}", prefix.trim_end_matches(['-', '.']))
}

/// The set's images in lanes: in the spec's order, as many lanes as [`LANE_IMAGES`] asks (at
/// most [`MAX_LANES`]), their lengths within one of each other. Each entry is the index of its
/// first image, and its images.
pub(crate) fn lanes(pinned: &[Pinned]) -> Vec<(usize, &[Pinned])> {
    let count = pinned.len().div_ceil(LANE_IMAGES).clamp(1, MAX_LANES);
    let (base, extra) = (pinned.len() / count, pinned.len() % count);
    let mut at = 0;
    (0..count)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let lane = (at, &pinned[at..at + len]);
            at += len;
            lane
        })
        .collect()
}

/// The DaemonSets of `set`, one per lane (see [`lanes`]), pulling `pinned` through the proxy on
/// `proxy_port`; `pull_secret` is kache's own token Secret, for private images.
pub(crate) fn daemon_sets(
    set: &NodeImageSet,
    pinned: &[Pinned],
    holder: &Holder,
    proxy_port: u16,
    pull_secret: Option<&str>,
) -> Vec<DaemonSet> {
    lanes(pinned)
        .into_iter()
        .enumerate()
        .map(|(lane, (first, images))| {
            let lane = Lane {
                index: lane,
                first,
                images,
            };
            daemon_set(set, &lane, holder, proxy_port, pull_secret)
        })
        .collect()
}

/// One lane: its number, the index of its first image in the set, and its images.
struct Lane<'a> {
    index: usize,
    first: usize,
    images: &'a [Pinned],
}

/// The DaemonSet of one lane of `set`.
fn daemon_set(
    set: &NodeImageSet,
    lane: &Lane<'_>,
    holder: &Holder,
    proxy_port: u16,
    pull_secret: Option<&str>,
) -> DaemonSet {
    let set_name = set.metadata.name.clone().unwrap_or_default();
    let label = label_value(&set_name);
    let lane_label = lane.index.to_string();
    let labels = json!({
        "app.kubernetes.io/name": "kache",
        "app.kubernetes.io/component": "node-images",
        "app.kubernetes.io/managed-by": "kache",
        NODE_IMAGE_SET_LABEL: label,
        LANE_LABEL: lane_label,
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
        "command": [KACHE, "prepull", "programs", "--dir", NOOP_DIR],
        "volumeMounts": [{"name": "noop", "mountPath": NOOP_DIR}],
        "securityContext": security,
        "resources": small,
    })];
    for (i, p) in lane.images.iter().enumerate() {
        let Some(image) = p.proxied(proxy_port) else {
            continue;
        };
        init.push(json!({
            "name": format!("image-{}", lane.first + i),
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
            "name": "hold",
            "image": holder.image,
            "imagePullPolicy": holder.image_pull_policy,
            "command": [HOLD],
            "volumeMounts": mount,
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
        "selector": {"matchLabels": {NODE_IMAGE_SET_LABEL: label, LANE_LABEL: lane_label}},
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
        "name": daemon_set_name(&set_name, lane.index),
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

/// The proxied references a holder DaemonSet's pods pull.
pub(crate) fn pulls(ds: &DaemonSet) -> BTreeSet<String> {
    pulled(ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()))
}

/// The images a holder pod spec pulls: its `image-*` init containers'.
fn pulled(spec: Option<&PodSpec>) -> BTreeSet<String> {
    spec.into_iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .filter(|c| c.name.starts_with("image-"))
        .filter_map(|c| c.image.clone())
        .collect()
}

/// What the holder pods of one set say.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Nodes {
    /// Nodes where every lane's pod runs the current images and is ready.
    pub ready: BTreeSet<String>,
    /// Images a node could not pull or run, with the kubelet's reason.
    pub failures: Vec<NodeImageFailure>,
}

/// Container states that are on the way, not failures.
const ON_THE_WAY: [&str; 2] = ["PodInitializing", "ContainerCreating"];

/// Reads the holder pods: which nodes hold every lane's images (`lanes[i]`: the proxied
/// references lane `i` pulls now), and what failed where. `images` maps a proxied reference
/// back to the spec's image. Pods of lanes the set no longer has are on their way out: ignored.
pub(crate) fn read_nodes<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    lanes: &[BTreeSet<String>],
    images: &BTreeMap<String, String>,
) -> Nodes {
    let mut out = Nodes::default();
    let mut held: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    for pod in pods {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        let Some(lane) = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LANE_LABEL))
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l < lanes.len())
        else {
            continue;
        };
        let has = pulled(pod.spec.as_ref());
        let status = pod.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready && has == lanes[lane] {
            held.entry(node.clone()).or_default().insert(lane);
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
    out.ready = held
        .into_iter()
        .filter(|(_, l)| l.len() == lanes.len())
        .map(|(node, _)| node)
        .collect();
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
        let ds = daemon_sets(
            &set("ml", spec),
            &pinned(),
            &with_secret,
            7439,
            Some("kache-pull"),
        );
        assert_eq!(ds.len(), 1, "two images are one lane");
        let v = serde_json::to_value(&ds[0]).unwrap();
        assert_eq!(v["metadata"]["name"], "kache-images-ml-0");
        assert_eq!(
            v["spec"]["selector"]["matchLabels"],
            json!({"kache.io/node-image-set": "ml", "kache.io/lane": "0"})
        );
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
            json!([KACHE, "prepull", "programs", "--dir", NOOP_DIR])
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
        assert_eq!(pod["containers"][0]["command"], json!([HOLD]));
        assert_eq!(pod["containers"][0]["volumeMounts"][0]["readOnly"], true);
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
        let lane = |p: &[Pinned]| daemon_sets(&s, p, &holder(), 7439, None).remove(0);
        let one = lane(&pinned()[..1]);
        let again = lane(&pinned()[..1]);
        let moved = vec![Pinned {
            image: "docker.io/library/python:3.12".into(),
            digest: D2.into(),
        }];
        let other = lane(&moved);
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
        let name = daemon_set_name(&long, MAX_LANES - 1);
        assert!(name.len() <= 52, "{name}");
        assert_ne!(name, daemon_set_name(&"a".repeat(201), MAX_LANES - 1));
        assert_ne!(name, daemon_set_name(&long, 0));
        assert_eq!(daemon_set_name("web", 2), "kache-images-web-2");
        let label = label_value(&long);
        assert!(label.len() <= 63, "{label}");
        assert_eq!(label_value("short"), "short");
    }

    fn pod(node: &str, images: &[&str], ready: bool, init_statuses: serde_json::Value) -> Pod {
        lane_pod(node, 0, images, ready, init_statuses)
    }

    fn lane_pod(
        node: &str,
        lane: usize,
        images: &[&str],
        ready: bool,
        init_statuses: serde_json::Value,
    ) -> Pod {
        let init: Vec<_> = images
            .iter()
            .enumerate()
            .map(|(i, im)| json!({"name": format!("image-{i}"), "image": im}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": format!("h-{node}-{lane}"), "labels": {LANE_LABEL: lane.to_string()}},
            "spec": {"nodeName": node, "initContainers": init, "containers": [{"name": "hold", "image": "k"}]},
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
        let nodes = read_nodes(pods.iter(), &[want], &images);
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
            &[[a.clone()].into()],
            &BTreeMap::new(),
        );
        assert_eq!(nodes.failures[0].reason, "Error");
        assert_eq!(
            nodes.failures[0].message.as_deref(),
            Some("exited with code 126")
        );
        assert_eq!(nodes.failures[0].image, a);
    }

    fn many(n: usize) -> Vec<Pinned> {
        (0..n)
            .map(|i| Pinned {
                image: format!("registry.local/team/app-{i}:v1"),
                digest: D1.into(),
            })
            .collect()
    }

    #[test]
    fn images_are_spread_over_lanes_in_order_and_evenly() {
        let shape = |n: usize| -> Vec<(usize, usize)> {
            lanes(&many(n))
                .iter()
                .map(|(first, images)| (*first, images.len()))
                .collect()
        };
        assert_eq!(shape(1), [(0, 1)]);
        assert_eq!(shape(4), [(0, 4)]);
        assert_eq!(shape(5), [(0, 3), (3, 2)]);
        assert_eq!(shape(20), [(0, 4), (4, 4), (8, 4), (12, 4), (16, 4)]);
        assert_eq!(shape(22), [(0, 5), (5, 5), (10, 4), (14, 4), (18, 4)]);
        assert_eq!(shape(100).len(), MAX_LANES);

        // Each lane is a DaemonSet of its own, its containers named by the images' places in
        // the set, its selector its own.
        let spec = NodeImageSetSpec {
            images: many(5).into_iter().map(|p| p.image).collect(),
            ..NodeImageSetSpec::default()
        };
        let ds = daemon_sets(&set("web", spec), &many(5), &holder(), 7439, None);
        let v: Vec<_> = ds
            .iter()
            .map(|d| serde_json::to_value(d).unwrap())
            .collect();
        assert_eq!(v[1]["metadata"]["name"], "kache-images-web-1");
        assert_eq!(
            v[1]["spec"]["selector"]["matchLabels"]["kache.io/lane"],
            "1"
        );
        assert_eq!(
            v[1]["spec"]["template"]["metadata"]["labels"]["kache.io/lane"],
            "1"
        );
        let names: Vec<&str> = v[1]["spec"]["template"]["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["noop", "image-3", "image-4"]);
        assert_ne!(spec_hash(&ds[0]), spec_hash(&ds[1]));
    }

    #[test]
    fn a_node_is_ready_once_every_lane_is() {
        let (a, b) = (
            format!("localhost:7439/docker.io/library/python@{D1}"),
            format!("localhost:7439/registry.local_5000/team/scratch@{D2}"),
        );
        let lanes: [BTreeSet<String>; 2] = [[a.clone()].into(), [b.clone()].into()];
        let pods = [
            lane_pod("n1", 0, &[&a], true, json!([])),
            lane_pod("n1", 1, &[&b], true, json!([])),
            lane_pod("n2", 0, &[&a], true, json!([])),
            lane_pod("n2", 1, &[&b], false, json!([])),
            // A lane the set no longer has, on its way out.
            lane_pod("n3", 0, &[&a], true, json!([])),
            lane_pod("n3", 1, &[&b], true, json!([])),
            lane_pod("n3", 2, &[&b], false, json!([])),
        ];
        let nodes = read_nodes(pods.iter(), &lanes, &BTreeMap::new());
        assert_eq!(nodes.ready, ["n1".to_owned(), "n3".to_owned()].into());
        // Lane 1's pod of n2 holds lane 0's image: not ready for either.
        let swapped = [
            lane_pod("n2", 0, &[&a], true, json!([])),
            lane_pod("n2", 1, &[&a], true, json!([])),
        ];
        assert!(
            read_nodes(swapped.iter(), &lanes, &BTreeMap::new())
                .ready
                .is_empty()
        );
    }
}
