//! Pre-caching: the images of workloads' pod templates get CachedImages before any pod exists,
//! exactly those the webhook will rewrite in their pods: the same [`Policy`], read from the same
//! flags, decides both.

use std::str::FromStr;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::PodSpec;
use kache_api::PRECACHE_ANNOTATION;
use kache_api::pod_marks::ContainerKind;
use kache_api::policy::{ContainerImage, Policy};
use kube::api::{DynamicObject, GroupVersionKind};
use kube::discovery::pinned_kind;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::{debug, info, warn};

use crate::decide;
use crate::ensure::Ensurer;

/// A workload kind whose pod template is pre-cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
    ReplicaSet,
    Job,
    CronJob,
}

impl WorkloadKind {
    /// Every kind, the default.
    pub const ALL: [WorkloadKind; 6] = [
        WorkloadKind::Deployment,
        WorkloadKind::StatefulSet,
        WorkloadKind::DaemonSet,
        WorkloadKind::ReplicaSet,
        WorkloadKind::Job,
        WorkloadKind::CronJob,
    ];

    /// The API versions to try, preferred first (`batch/v1` CronJob is 1.21+).
    fn versions(self) -> &'static [(&'static str, &'static str)] {
        match self {
            WorkloadKind::Deployment
            | WorkloadKind::StatefulSet
            | WorkloadKind::DaemonSet
            | WorkloadKind::ReplicaSet => &[("apps", "v1")],
            WorkloadKind::Job => &[("batch", "v1")],
            WorkloadKind::CronJob => &[("batch", "v1"), ("batch", "v1beta1")],
        }
    }

    fn kind(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
            WorkloadKind::ReplicaSet => "ReplicaSet",
            WorkloadKind::Job => "Job",
            WorkloadKind::CronJob => "CronJob",
        }
    }
}

impl FromStr for WorkloadKind {
    type Err = String;

    /// `deployments`, `Deployment`, `deployment` all name one kind.
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        let singular = lower.strip_suffix('s').unwrap_or(&lower);
        WorkloadKind::ALL
            .into_iter()
            .find(|k| k.kind().to_ascii_lowercase() == singular)
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a workload kind (deployments, statefulsets, daemonsets, replicasets, jobs, cronjobs)"
                )
            })
    }
}

/// The pod spec inside a workload object, and the template's labels.
pub fn template_spec(
    kind: WorkloadKind,
    obj: &serde_json::Value,
) -> Option<(PodSpec, serde_json::Value)> {
    let template = match kind {
        WorkloadKind::CronJob => obj.pointer("/spec/jobTemplate/spec/template")?,
        _ => obj.pointer("/spec/template")?,
    };
    let spec = serde_json::from_value(template.get("spec")?.clone()).ok()?;
    let labels = template
        .pointer("/metadata/labels")
        .cloned()
        .unwrap_or_default();
    Some((spec, labels))
}

/// The normalised images of a workload's pod template that its pods will pull through the proxy:
/// none when the workload opted out (`kache.io/precache: "false"`) or is owned by another, and
/// otherwise what `policy` takes of the template in the workload's namespace, as the webhook
/// will decide for each of its pods.
pub fn workload_images(kind: WorkloadKind, obj: &DynamicObject, policy: &Policy) -> Vec<String> {
    if obj
        .annotations()
        .get(PRECACHE_ANNOTATION)
        .map(String::as_str)
        == Some("false")
    {
        return Vec::new();
    }
    // A ReplicaSet of a Deployment is the Deployment's.
    if kind == WorkloadKind::ReplicaSet && !obj.owner_references().is_empty() {
        return Vec::new();
    }
    let Some((spec, labels)) = template_spec(kind, &obj.data) else {
        return Vec::new();
    };
    let label = |k: &str| labels.get(k).and_then(|v| v.as_str());
    if policy.pod(obj.namespace().as_deref(), label).is_err() {
        return Vec::new();
    }
    let containers = spec
        .containers
        .iter()
        .map(|c| (ContainerKind::Container, c))
        .chain(
            spec.init_containers
                .iter()
                .flatten()
                .map(|c| (ContainerKind::Init, c)),
        );
    let mut images: Vec<String> = containers
        .filter_map(|(kind, c)| {
            let taken = policy.image(&ContainerImage {
                kind,
                name: &c.name,
                image: c.image.as_deref(),
                pull_policy: c.image_pull_policy.as_deref(),
            });
            Some(taken.ok()?.source.to_string())
        })
        .collect();
    images.sort();
    images.dedup();
    images
}

/// Watches every configured kind the API server serves; a kind it does not serve is skipped.
pub(crate) async fn run(
    client: Client,
    kinds: Vec<WorkloadKind>,
    policy: Arc<Policy>,
    ensurer: Ensurer,
) {
    let mut tasks = Vec::new();
    for kind in kinds {
        let mut found = None;
        for (group, version) in kind.versions() {
            let gvk = GroupVersionKind::gvk(group, version, kind.kind());
            match pinned_kind(&client, &gvk).await {
                Ok((ar, _)) => {
                    found = Some(ar);
                    break;
                }
                Err(e) => debug!(%group, %version, kind = kind.kind(), error = %e, "not served"),
            }
        }
        let Some(ar) = found else {
            info!(
                kind = kind.kind(),
                "the API server serves no version of this kind: not pre-caching it"
            );
            continue;
        };
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let ensurer = ensurer.clone();
        let policy = policy.clone();
        tasks.push(async move {
            watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .for_each(|obj| {
                    let ensurer = ensurer.clone();
                    let policy = policy.clone();
                    async move {
                        let obj = match obj {
                            Ok(o) => o,
                            Err(e) => {
                                warn!(kind = kind.kind(), error = %e, "workload watch error");
                                return;
                            }
                        };
                        let ns = obj.namespace().unwrap_or_default();
                        let secrets = template_spec(kind, &obj.data)
                            .map(|(spec, _)| decide::pull_secrets(&ns, Some(&spec)))
                            .unwrap_or_default();
                        for image in workload_images(kind, &obj, &policy) {
                            if let Err(e) = ensurer.ensure(&image, &secrets, None).await {
                                warn!(%image, workload = %format!("{}/{ns}/{}", kind.kind(), obj.name_any()),
                                    error = %e, "cannot pre-cache");
                            }
                        }
                    }
                })
                .await
        });
    }
    futures_util::future::join_all(tasks).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: serde_json::Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn kinds_parse_in_any_usual_spelling() {
        assert_eq!("deployments".parse(), Ok(WorkloadKind::Deployment));
        assert_eq!("CronJob".parse(), Ok(WorkloadKind::CronJob));
        assert_eq!("statefulset".parse(), Ok(WorkloadKind::StatefulSet));
        assert!("pods".parse::<WorkloadKind>().is_err());
    }

    #[test]
    fn images_of_templates() {
        let deploy = obj(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "a"},
            "spec": {"replicas": 0, "template": {"spec": {
                "initContainers": [{"name": "i", "image": "busybox:1"}],
                "containers": [{"name": "c", "image": "nginx:1.27"}, {"name": "d", "image": "nginx:1.27"},
                               {"name": "e", "image": "localhost:7439/docker.io/library/x:1"}]
            }}}
        }));
        assert_eq!(
            workload_images(WorkloadKind::Deployment, &deploy, &Policy::default()),
            [
                "docker.io/library/busybox:1",
                "docker.io/library/nginx:1.27"
            ]
        );
        let cron = obj(serde_json::json!({
            "apiVersion": "batch/v1beta1", "kind": "CronJob", "metadata": {"name": "c"},
            "spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "ghcr.io/o/job:2"}]}}}}}
        }));
        assert_eq!(
            workload_images(WorkloadKind::CronJob, &cron, &Policy::default()),
            ["ghcr.io/o/job:2"]
        );
    }

    #[test]
    fn opted_out_owned_and_ignored_templates_are_skipped() {
        let base = |meta: serde_json::Value, labels: serde_json::Value| {
            obj(serde_json::json!({
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": meta,
                "spec": {"template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}
            }))
        };
        let plain = base(serde_json::json!({"name": "r"}), serde_json::json!({}));
        assert_eq!(
            workload_images(WorkloadKind::ReplicaSet, &plain, &Policy::default()).len(),
            1
        );
        let opted_out = base(
            serde_json::json!({"name": "r", "annotations": {"kache.io/precache": "false"}}),
            serde_json::json!({}),
        );
        assert!(
            workload_images(WorkloadKind::ReplicaSet, &opted_out, &Policy::default()).is_empty()
        );
        let owned = base(
            serde_json::json!({"name": "r", "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "d", "uid": "u"}]}),
            serde_json::json!({}),
        );
        assert!(workload_images(WorkloadKind::ReplicaSet, &owned, &Policy::default()).is_empty());
        let ignored = base(
            serde_json::json!({"name": "r"}),
            serde_json::json!({"kache.io/image-caching-policy": "ignore"}),
        );
        assert!(workload_images(WorkloadKind::ReplicaSet, &ignored, &Policy::default()).is_empty());
    }

    /// Each of the webhook's exclusions leaves the workload's images alone too, and only the
    /// image it excludes: the same policy decides both.
    #[test]
    fn what_the_webhook_leaves_alone_is_not_pre_cached() {
        let policy = Policy {
            ignored_namespaces: vec!["kube-system".into(), "kache".into()],
            object_selector: kache_api::policy::Selector::from_json(
                r#"{"matchExpressions":[{"key":"team","operator":"NotIn","values":["infra"]}]}"#,
            )
            .unwrap(),
            ignore_registries: vec![
                kache_api::policy::Pattern::registry("private.example").unwrap(),
            ],
            accept: vec![
                kache_api::policy::Pattern::image("docker.io/*").unwrap(),
                kache_api::policy::Pattern::image("private.example").unwrap(),
            ],
            ..Policy::default()
        };
        let deployment = |ns: &str, labels: serde_json::Value, images: &[&str]| {
            obj(serde_json::json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "d", "namespace": ns},
                "spec": {"template": {"metadata": {"labels": labels}, "spec": {"containers":
                    images.iter().enumerate().map(|(i, image)| serde_json::json!({"name": format!("c{i}"), "image": image, "imagePullPolicy": "IfNotPresent"})).collect::<Vec<_>>()
                }}}
            }))
        };
        let images = |d: &DynamicObject| workload_images(WorkloadKind::Deployment, d, &policy);
        let all = [
            "nginx:1",
            "private.example/app:1",
            "quay.io/o/x:1",
            "localhost:5000/dev:1",
        ];
        assert_eq!(
            images(&deployment("shop", serde_json::json!({}), &all)),
            ["docker.io/library/nginx:1"],
            "an ignored registry, an image not accepted and a loopback registry are left out"
        );
        for (ns, labels) in [
            ("kube-system", serde_json::json!({})),
            ("kache", serde_json::json!({})),
            ("shop", serde_json::json!({"team": "infra"})),
            (
                "shop",
                serde_json::json!({"kache.io/image-caching-policy": "ignore"}),
            ),
        ] {
            assert!(
                images(&deployment(ns, labels.clone(), &all)).is_empty(),
                "{ns} {labels}"
            );
        }
        let never = obj(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "shop"},
            "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "nginx:1", "imagePullPolicy": "Never"}]}}}
        }));
        assert!(
            images(&never).is_empty(),
            "imagePullPolicy: Never is never pulled"
        );
    }
}
