//! The controllers' decisions as pure functions: what the API objects say in, what to do out.
//! Everything that talks to the API server or the registry lives elsewhere.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod, PodSpec};
use k8s_openapi::jiff::Timestamp;
use kache_api::{CachedImageSpec, SecretReference};
use kache_oci::ImageReference;
use kache_oci::credentials::{Credentials, DockerConfig};

/// The platform assumed when the cluster has no nodes yet.
pub const DEFAULT_PLATFORM: &str = "linux/amd64";

/// Normalises an image as written in a pod spec (`nginx`, `ghcr.io/o/a:1`); `None` when it is
/// not a valid reference.
pub fn normalise(image: &str) -> Option<String> {
    image.parse::<ImageReference>().ok().map(|r| r.to_string())
}

/// Whether a pod still holds its images: pods that ended (Succeeded, Failed) do not.
pub fn pod_is_live(pod: &Pod) -> bool {
    !matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The normalised original images of a pod the webhook rewrote.
pub fn pod_images(pod: &Pod) -> BTreeSet<String> {
    kache_api::pod_marks::original_images(pod)
        .into_iter()
        .filter_map(|(_, _, image)| normalise(&image))
        .collect()
}

/// `namespace/name` of an object.
pub fn key(namespace: Option<&str>, name: Option<&str>) -> String {
    format!("{}/{}", namespace.unwrap_or(""), name.unwrap_or(""))
}

/// Whether `pod` is live and runs `image` (an original image, before the rewrite).
pub fn uses(pod: &Pod, image: &str) -> bool {
    pod_is_live(pod) && pod_images(pod).contains(image)
}

/// The live pods (as `namespace/name`) among `pods` whose original images include `image`.
pub fn users<'a>(image: &str, pods: impl IntoIterator<Item = &'a Pod>) -> Vec<String> {
    pods.into_iter()
        .filter(|p| uses(p, image))
        .map(|p| key(p.metadata.namespace.as_deref(), p.metadata.name.as_deref()))
        .collect()
}

/// The pull secrets a pod spec names, in its namespace.
pub fn pull_secrets(namespace: &str, spec: Option<&PodSpec>) -> Vec<SecretReference> {
    spec.and_then(|s| s.image_pull_secrets.as_ref())
        .into_iter()
        .flatten()
        .filter(|r| !r.name.is_empty())
        .map(|r| SecretReference {
            namespace: namespace.to_owned(),
            name: r.name.clone(),
        })
        .collect()
}

/// `existing` with the references of `more` it lacks, sorted; `None` when nothing is new.
pub fn merge_secrets(
    existing: &[SecretReference],
    more: &[SecretReference],
) -> Option<Vec<SecretReference>> {
    let mut all: BTreeSet<_> = existing.iter().cloned().collect();
    let before = all.len();
    all.extend(more.iter().cloned());
    (all.len() != before).then(|| all.into_iter().collect())
}

/// What the expiry clock says about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expiry {
    /// In use or retained: no expiry.
    Keep,
    /// Unused: it goes at this time (already set, or set now).
    At(Timestamp),
    /// Unused and its time has come.
    Due,
}

/// The expiry decision for an image used by `used` live pods.
pub fn expiry(spec: &CachedImageSpec, used: usize, now: Timestamp, delay: Duration) -> Expiry {
    if used > 0 || spec.retain {
        return Expiry::Keep;
    }
    match &spec.expires_at {
        Some(t) if t.0 <= now => Expiry::Due,
        Some(t) => Expiry::At(t.0),
        None => Expiry::At(add(now, delay)),
    }
}

/// `t + d`, saturating at the latest time Kubernetes can represent.
pub fn add(t: Timestamp, d: Duration) -> Timestamp {
    let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let max = Timestamp::from_second(253_402_207_199).expect("year 9999 is a timestamp");
    Timestamp::from_second(t.as_second().saturating_add(secs))
        .unwrap_or(max)
        .min(max)
}

/// The platforms of the cluster's nodes (`linux/amd64`, `linux/arm64`), sorted;
/// [`DEFAULT_PLATFORM`] when no node says.
pub fn platforms<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Vec<String> {
    let set: BTreeSet<String> = nodes
        .into_iter()
        .filter_map(|n| n.status.as_ref()?.node_info.as_ref())
        .filter(|i| !i.operating_system.is_empty() && !i.architecture.is_empty())
        .map(|i| format!("{}/{}", i.operating_system, i.architecture))
        .collect();
    if set.is_empty() {
        vec![DEFAULT_PLATFORM.to_owned()]
    } else {
        set.into_iter().collect()
    }
}

/// The username and password for `image` from the first of `configs` (the referenced Secrets,
/// in order) that has Basic credentials for its registry. `None` leaves it to the registry's own
/// (global) credentials. An identity token cannot be handed to the registry for one fetch and is
/// passed over.
pub fn credentials_for(image: &str, configs: &[DockerConfig]) -> Option<(String, String)> {
    let registry = image.parse::<ImageReference>().ok()?.registry;
    configs.iter().find_map(|c| match c.lookup(&registry)? {
        Credentials::Basic { username, password } => Some((username, password)),
        Credentials::IdentityToken(_) => None,
    })
}

/// Exponential backoff after `failures` consecutive failures: 5 s, 10 s, ... up to 10 minutes.
pub fn backoff(failures: u32) -> Duration {
    let secs = 5u64.saturating_mul(1u64 << failures.min(16).saturating_sub(1));
    Duration::from_secs(secs.min(600))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeStatus, NodeSystemInfo, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn expiry_table() {
        let delay = Duration::from_secs(100);
        let now = ts(1_000);
        let spec = |retain, at: Option<i64>| CachedImageSpec {
            source_image: "docker.io/library/nginx:1".into(),
            retain,
            expires_at: at.map(|s| Time(ts(s))),
            pull_secrets: vec![],
        };
        let table = [
            // (retain, expiresAt, pods using it) -> decision
            (false, None, 1, Expiry::Keep),
            (false, Some(900), 2, Expiry::Keep), // due, but in use again: cleared
            (true, None, 0, Expiry::Keep),
            (true, Some(900), 0, Expiry::Keep),
            (false, None, 0, Expiry::At(ts(1_100))),
            (false, Some(1_050), 0, Expiry::At(ts(1_050))), // the clock is not restarted
            (false, Some(1_000), 0, Expiry::Due),
            (false, Some(10), 0, Expiry::Due),
        ];
        for (retain, at, used, want) in table {
            assert_eq!(
                expiry(&spec(retain, at), used, now, delay),
                want,
                "{retain} {at:?} {used}"
            );
        }
    }

    fn pod(ns: &str, name: &str, phase: Option<&str>, images: &[(&str, &str)]) -> Pod {
        let mut p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": name, "labels": {"kache.io/managed": "true"}},
            "spec": {"containers": images.iter().map(|(n, i)| serde_json::json!({"name": n, "image": i})).collect::<Vec<_>>()}
        }))
        .unwrap();
        p.status = phase.map(|ph| PodStatus {
            phase: Some(ph.into()),
            ..Default::default()
        });
        p
    }

    #[test]
    fn usage_counts_live_pods_on_the_proxy_only() {
        let pods = [
            pod(
                "a",
                "web-1",
                Some("Running"),
                &[("c", "localhost:7439/docker.io/library/nginx:1.27")],
            ),
            pod(
                "a",
                "web-2",
                None,
                &[("c", "localhost:7439/docker.io/library/nginx:1.27")],
            ),
            pod(
                "b",
                "job",
                Some("Succeeded"),
                &[("c", "localhost:7439/docker.io/library/nginx:1.27")],
            ),
            pod(
                "b",
                "other",
                Some("Running"),
                &[("c", "localhost:7439/docker.io/library/redis:7")],
            ),
            pod("b", "direct", Some("Running"), &[("c", "nginx:1.27")]),
        ];
        let mut u = users("docker.io/library/nginx:1.27", &pods);
        u.sort();
        assert_eq!(u, ["a/web-1", "a/web-2"]);
        assert!(users("docker.io/library/busybox:1", &pods).is_empty());
    }

    #[test]
    fn original_images_are_normalised() {
        let p = pod(
            "a",
            "x",
            None,
            &[("c", "localhost:7439/docker.io/library/nginx:latest")],
        );
        assert_eq!(
            pod_images(&p).into_iter().collect::<Vec<_>>(),
            ["docker.io/library/nginx:latest"]
        );
        assert_eq!(
            normalise("nginx").as_deref(),
            Some("docker.io/library/nginx:latest")
        );
        assert_eq!(normalise("Not A Reference"), None);
    }

    #[test]
    fn secrets_merge_without_duplicates() {
        let s = |ns: &str, n: &str| SecretReference {
            namespace: ns.into(),
            name: n.into(),
        };
        assert_eq!(merge_secrets(&[s("a", "x")], &[s("a", "x")]), None);
        assert_eq!(
            merge_secrets(&[s("b", "y")], &[s("a", "x"), s("b", "y")]),
            Some(vec![s("a", "x"), s("b", "y")])
        );
    }

    fn node(os: &str, arch: &str) -> Node {
        Node {
            status: Some(NodeStatus {
                node_info: Some(NodeSystemInfo {
                    operating_system: os.into(),
                    architecture: arch.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn platforms_of_the_nodes() {
        assert_eq!(platforms(&[]), [DEFAULT_PLATFORM]);
        assert_eq!(platforms(&[Node::default()]), [DEFAULT_PLATFORM]);
        let nodes = [
            node("linux", "arm64"),
            node("linux", "amd64"),
            node("linux", "arm64"),
        ];
        assert_eq!(platforms(&nodes), ["linux/amd64", "linux/arm64"]);
    }

    #[test]
    fn credentials_come_from_the_first_secret_for_the_registry() {
        let cfg = |json: &str| DockerConfig::from_json(json.as_bytes()).unwrap();
        let hub =
            cfg(r#"{"auths":{"https://index.docker.io/v1/":{"username":"hub","password":"p1"}}}"#);
        let ghcr = cfg(r#"{"auths":{"ghcr.io":{"username":"gh","password":"p2"}}}"#);
        let token = cfg(r#"{"auths":{"ghcr.io":{"identitytoken":"t"}}}"#);
        let configs = [token, hub, ghcr];
        assert_eq!(
            credentials_for("docker.io/library/nginx:1", &configs),
            Some(("hub".into(), "p1".into()))
        );
        assert_eq!(
            credentials_for("ghcr.io/o/a:1", &configs),
            Some(("gh".into(), "p2".into()))
        );
        assert_eq!(credentials_for("quay.io/o/a:1", &configs), None);
    }

    #[test]
    fn backoff_grows_and_stops_growing() {
        let secs: Vec<_> = [0, 1, 2, 3, 8, 30].map(|n| backoff(n).as_secs()).into();
        assert_eq!(secs, [5, 5, 10, 20, 600, 600]);
    }
}
