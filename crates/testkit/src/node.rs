//! A real node (kubelet, containerd's CRI, runc, bridge CNI) beside a test control plane, started
//! by `scripts/kube-test-node`, and the kache image that runs on it, as `scripts/build-image`
//! makes it. A node needs root and the current Kubernetes version.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use std::time::Duration;

use base64::Engine as _;

use super::kube::{KubeServer, log_tail, script};
use super::pki::{certificates, free_addr};

/// How long kache's pods get to become Ready.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// kache as crates/testkit/manifests/kache-on-node.yaml runs it on the node: where each component
/// listens (on the node's 127.0.0.1) and what it is given.
#[derive(Debug, Clone)]
pub struct KacheOnNode {
    /// The kache image, as imported on the node.
    pub image: String,
    pub registry: String,
    /// The registry's internal (write) listener, which the controller calls.
    pub internal: String,
    pub registry_metrics: String,
    pub proxy_metrics: String,
    pub webhook: String,
    pub webhook_metrics: String,
    pub controller_metrics: String,
    /// The registry's store on the node, owned by the image's user.
    pub data_dir: PathBuf,
    /// Upstream registries reached over plain HTTP (`host:port`).
    pub upstreams: Vec<String>,
    /// The key pull tokens are signed under (id `k1`).
    pub pull_token_key: Vec<u8>,
}

impl KacheOnNode {
    /// Free ports for every listener; `data_dir` is created for the image's user (65532).
    pub fn new(image: &str, data_dir: &Path, upstreams: &[&str]) -> Self {
        std::fs::create_dir_all(data_dir).expect("create the registry's data dir");
        std::os::unix::fs::chown(data_dir, Some(65532), Some(65532)).expect("chown the data dir");
        KacheOnNode {
            image: image.to_owned(),
            registry: free_addr(),
            internal: free_addr(),
            registry_metrics: free_addr(),
            proxy_metrics: free_addr(),
            webhook: free_addr(),
            webhook_metrics: free_addr(),
            controller_metrics: free_addr(),
            data_dir: data_dir.to_owned(),
            upstreams: upstreams.iter().map(|u| (*u).to_owned()).collect(),
            pull_token_key: crate::image::random_bytes(7439, 32),
        }
    }

    /// crates/testkit/manifests/kache-on-node.yaml with every placeholder filled in.
    fn manifests(&self, api_port: &str, tls_dir: &Path, ca: &str) -> String {
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let read = |name: &str| std::fs::read(tls_dir.join(name)).expect("the webhook's pair");
        let port = |addr: &str| addr.rsplit_once(':').expect("host:port").1.to_owned();
        let values = [
            ("IMAGE", self.image.clone()),
            ("REGISTRY", self.registry.clone()),
            ("INTERNAL", self.internal.clone()),
            ("REGISTRY_METRICS", self.registry_metrics.clone()),
            ("REGISTRY_METRICS_PORT", port(&self.registry_metrics)),
            ("PROXY_METRICS", self.proxy_metrics.clone()),
            ("PROXY_METRICS_PORT", port(&self.proxy_metrics)),
            ("WEBHOOK", self.webhook.clone()),
            ("WEBHOOK_METRICS", self.webhook_metrics.clone()),
            ("WEBHOOK_METRICS_PORT", port(&self.webhook_metrics)),
            ("CONTROLLER_METRICS", self.controller_metrics.clone()),
            ("CONTROLLER_METRICS_PORT", port(&self.controller_metrics)),
            (
                "DATA_DIR",
                self.data_dir.to_str().expect("a UTF-8 path").to_owned(),
            ),
            ("UPSTREAMS", self.upstreams.join(",")),
            ("API_PORT", api_port.to_owned()),
            ("TLS_CRT", b64(&read("tls.crt"))),
            ("TLS_KEY", b64(&read("tls.key"))),
            ("CA_BUNDLE", b64(ca.as_bytes())),
            ("PULL_TOKEN_KEY", b64(&self.pull_token_key)),
        ];
        let mut text = include_str!("../manifests/kache-on-node.yaml").to_owned();
        for (k, v) in values {
            text = text.replace(&format!("@{k}@"), &v);
        }
        let body = text.lines().filter(|l| !l.trim_start().starts_with('#'));
        assert!(
            !body.clone().any(|l| l.contains('@')),
            "a placeholder is left: {}",
            body.collect::<Vec<_>>().join("\n")
        );
        text
    }
}

/// Packages another program (cert-manager's for the chart's tests, distribution and skopeo for
/// the compose file's) the way kache's image is made, as `/usr/local/bin/<program>`, with the
/// programs of `also` beside it under their names; returns the archive to import.
pub fn build_program_image(
    binary: &Path,
    out: &Path,
    program: &str,
    version: &str,
    name: &str,
    also: &[(&Path, &str)],
) -> PathBuf {
    let mut args = vec![
        "--program".to_owned(),
        program.to_owned(),
        "--version".to_owned(),
        version.to_owned(),
    ];
    for (path, as_name) in also {
        args.push("--also".to_owned());
        args.push(format!("{}={as_name}", path.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    build_image(binary, out, Some(name), &args);
    out.join(format!("{program}-image.tar"))
}

/// Runs `scripts/build-image` on `binary`; returns the manifest digest it printed. Without a
/// name, the image gets the script's default (the chart's default image).
fn build_image(binary: &Path, out: &Path, name: Option<&str>, extra: &[&str]) -> String {
    let o = Command::new(script("build-image"))
        .arg("--binary")
        .arg(binary)
        .arg("--out")
        .arg(out)
        .args(name.map(|n| ["--name", n]).into_iter().flatten())
        .args(extra)
        .output()
        .expect("run scripts/build-image");
    assert!(
        o.status.success(),
        "build-image failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap().trim().to_owned()
}

/// Packages a kache binary with `scripts/build-image` into `out` under `name` (the script's
/// default, `ghcr.io/kache-io/kache:<version>`, when `None`); returns the manifest digest it
/// printed. `out/kache-image.tar` is the archive.
pub fn build_kache_image(binary: &Path, out: &Path, name: Option<&str>) -> String {
    build_image(binary, out, name, &[])
}

/// The node `127.0.0.1`; stopped on drop (declare it after the [`KubeServer`], so that it
/// stops first).
#[derive(Debug)]
pub struct KubeNode {
    /// The control plane's directory; the node's files are in `node/`.
    dir: PathBuf,
    /// crictl of the node's Kubernetes version.
    crictl: PathBuf,
}

impl KubeNode {
    /// Starts kubelet and containerd and waits until the node is Ready and schedulable.
    pub fn start(kube: &KubeServer) -> Self {
        let dir = kube.dir().to_owned();
        let out = Command::new("bash")
            .arg(script("kube-test-node"))
            .arg("start")
            .arg(&dir)
            .output()
            .expect("run scripts/kube-test-node");
        let node = KubeNode {
            dir,
            crictl: kube.bin.join("crictl"),
        };
        assert!(
            out.status.success(),
            "kube-test-node start failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            node.logs()
        );
        node
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join("node").join(name)
    }

    /// `ctr` in the CRI's namespace (`k8s.io`), where the kubelet's images live.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.path("containerd.sock"))
            .args(["-n", "k8s.io"])
            .args(args)
            .output()
            .expect("run ctr")
    }

    fn ctr_ok(&self, args: &[&str]) -> String {
        let o = self.ctr(args);
        assert!(
            o.status.success(),
            "ctr {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Imports an image archive (`ctr images import`), as a node gets images no registry serves.
    pub fn import(&self, archive: &Path) {
        self.ctr_ok(&["images", "import", archive.to_str().expect("a UTF-8 path")]);
    }

    /// The names of the images the node holds.
    pub fn images(&self) -> Vec<String> {
        self.ctr_ok(&["images", "ls", "-q"])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The digests of the images the CRI (what the kubelet asks) says the node holds, as
    /// `name@sha256:...`.
    pub fn cri_image_digests(&self) -> Vec<String> {
        let v = self.crictl_json(&["images", "-o", "json"]);
        v["images"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|i| i["repoDigests"].as_array().cloned().unwrap_or_default())
            .filter_map(|d| d.as_str().map(str::to_owned))
            .collect()
    }

    /// The memory a running pod's cgroup charges now (its containers and sandbox together), found
    /// above its container `container`'s: cgroup v1's `memory.usage_in_bytes` or v2's
    /// `memory.current`.
    pub fn pod_memory(&self, pod: &str, container: &str) -> u64 {
        let ps = self.crictl_json(&["ps", "-o", "json"]);
        let id = ps["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| {
                c["labels"]["io.kubernetes.pod.name"] == pod
                    && c["labels"]["io.kubernetes.container.name"] == container
            })
            .and_then(|c| c["id"].as_str())
            .unwrap_or_else(|| panic!("no running container {container} of {pod}: {ps}"))
            .to_owned();
        // The container's cgroup is named after its id (either cgroup driver, v1 or v2); its
        // pod's is the one above.
        let found = ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"]
            .iter()
            .find_map(|root| find_dir(Path::new(root), &id, 10))
            .unwrap_or_else(|| panic!("no cgroup named after container {id}"));
        let pod_cgroup = found.parent().expect("a pod cgroup above");
        let file = ["memory.usage_in_bytes", "memory.current"]
            .iter()
            .map(|f| pod_cgroup.join(f))
            .find(|f| f.exists())
            .unwrap_or_else(|| panic!("no memory figure in {}", pod_cgroup.display()));
        std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .trim()
            .parse()
            .expect("a byte count")
    }

    /// Whether containerd holds the blob `digest` in its content store.
    pub fn has_content(&self, digest: &str) -> bool {
        self.ctr_ok(&["content", "ls", "-q"])
            .lines()
            .any(|l| l == digest)
    }

    /// `crictl` on the node's CRI.
    fn crictl(&self, args: &[&str]) -> Output {
        let endpoint = format!("unix://{}", self.path("containerd.sock").display());
        Command::new(&self.crictl)
            .args([
                "--runtime-endpoint",
                &endpoint,
                "--image-endpoint",
                &endpoint,
            ])
            .args(args)
            .output()
            .expect("run crictl")
    }

    /// `crictl` on the node's CRI, as `json`.
    fn crictl_json(&self, args: &[&str]) -> serde_json::Value {
        let o = self.crictl(args);
        assert!(
            o.status.success(),
            "crictl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
        if args.contains(&"json") {
            serde_json::from_slice(&o.stdout).expect("crictl's JSON")
        } else {
            serde_json::Value::Null
        }
    }

    /// Pulls `image` through the CRI, as the kubelet would for a pod.
    pub fn pull(&self, image: &str) {
        self.crictl_json(&["pull", image]);
    }

    /// Restarts the kubelet; its pods run on. With `image_gc`, its image garbage collection
    /// removes every image no container uses, once at start and every 5 minutes after (as on a
    /// node whose disk is full); without, it never runs (how the node starts).
    pub fn restart_kubelet(&self, image_gc: bool) {
        let mut cmd = Command::new("bash");
        cmd.arg(script("kube-test-node"))
            .arg("restart-kubelet")
            .arg(&self.dir);
        if image_gc {
            cmd.arg("gc");
        }
        let out = cmd.output().expect("run scripts/kube-test-node");
        assert!(
            out.status.success(),
            "kube-test-node restart-kubelet failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
    }

    /// Makes the node forget every image with a name that starts with `prefix`, content and
    /// unpacked layers included: the next pod has to pull all of it again. It goes through the
    /// CRI (crictl), which keeps its own view of the node's images: removed beneath it (with
    /// `ctr`), an image may still be reported present for a moment. The containers made from
    /// those images go first (their pods must be gone from the API): a container, even a
    /// stopped one the kubelet has not collected yet, holds its image's unpacked layers, and a
    /// pull finding them fetches no layer at all.
    pub fn forget(&self, prefix: &str) {
        let images = self.crictl_json(&["images", "-o", "json"]);
        let ids: Vec<String> = images["images"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| {
                ["repoTags", "repoDigests"].iter().any(|k| {
                    i[*k]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|n| n.as_str().is_some_and(|n| n.starts_with(prefix)))
                })
            })
            .filter_map(|i| i["id"].as_str().map(str::to_owned))
            .collect();
        if ids.is_empty() {
            return;
        }
        let of_images = |all: bool| -> Vec<String> {
            let args: &[&str] = if all {
                &["ps", "-a", "-o", "json"]
            } else {
                &["ps", "-o", "json"]
            };
            let list = self.crictl_json(args);
            list["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| {
                    [&c["imageRef"], &c["image"]["image"]]
                        .iter()
                        .any(|i| i.as_str().is_some_and(|i| ids.iter().any(|id| id == i)))
                })
                .filter_map(|c| c["id"].as_str().map(str::to_owned))
                .collect()
        };
        // The kubelet stops a deleted pod's containers once it hears of the deletion; one
        // removed before that is restarted by it, and its image pulled back.
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        while !of_images(false).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "containers of {prefix} still run: are their pods deleted?"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        for id in of_images(true) {
            // The kubelet's own clean-up may remove an exited container first: gone is gone.
            let o = self.crictl(&["rm", "-f", &id]);
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(
                o.status.success() || stderr.contains("NotFound") || stderr.contains("not found"),
                "crictl rm -f {id}: {stderr}"
            );
        }
        for id in &ids {
            self.crictl_json(&["rmi", id]);
        }
    }

    /// Runs kache on the node as users will (the CRD, the chart's controller RBAC, then
    /// crates/testkit/manifests/kache-on-node.yaml, in the namespace `kache`) and waits until every
    /// component is Ready. The webhook's certificate is made in `tls_dir`.
    pub fn deploy_kache(&self, kube: &KubeServer, kache: &KacheOnNode, tls_dir: &Path) {
        kube.namespace("kache");
        kube.apply_yaml(include_str!("../../api/crds.yaml"));
        kube.apply_yaml(&super::helm::controller_rbac_with(
            kube,
            &["--set", "privateImages.enabled=true"],
        ));
        std::fs::create_dir_all(tls_dir).expect("create the webhook's cert dir");
        let ca = certificates(tls_dir);
        let api_port = kube.api.rsplit_once(':').expect("https://host:port").1;
        kube.apply_yaml(&kache.manifests(api_port, tls_dir, &ca));
        for (resource, name) in [
            ("deployments", "kache-registry"),
            ("deployments", "kache-webhook"),
            ("deployments", "kache-controller"),
            ("daemonsets", "kache-proxy"),
        ] {
            self.wait_ready(kube, resource, name);
        }
    }

    /// Waits until every replica of a Deployment or DaemonSet in `kache` is Ready and current.
    pub fn wait_ready(&self, kube: &KubeServer, resource: &str, name: &str) {
        self.wait_ready_in(kube, "kache", resource, name);
    }

    /// Waits until every replica of a Deployment, StatefulSet or DaemonSet is Ready and current.
    pub fn wait_ready_in(&self, kube: &KubeServer, ns: &str, resource: &str, name: &str) {
        let path = format!("/apis/apps/v1/namespaces/{ns}/{resource}/{name}");
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        loop {
            let (code, v) = kube.request("GET", &path, None);
            let s = &v["status"];
            let ready = code == 200
                && if resource == "daemonsets" {
                    s["numberReady"].as_u64().unwrap_or(0) >= 1
                        && s["numberReady"] == s["desiredNumberScheduled"]
                        && s["updatedNumberScheduled"] == s["desiredNumberScheduled"]
                } else {
                    // The controller has seen the latest spec, and every replica runs it.
                    s["observedGeneration"].as_u64() >= v["metadata"]["generation"].as_u64()
                        && s["readyReplicas"].as_u64().unwrap_or(0) >= 1
                        && s["readyReplicas"] == v["spec"]["replicas"]
                        && s["updatedReplicas"] == v["spec"]["replicas"]
                        && s["replicas"] == v["spec"]["replicas"]
                };
            if ready {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} never became ready: {s}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until pod `ns/name` runs and is ready; on timeout, says what the kubelet reported.
    pub fn wait_running(
        &self,
        kube: &KubeServer,
        ns: &str,
        name: &str,
        timeout: Duration,
    ) -> serde_json::Value {
        let path = format!("/api/v1/namespaces/{ns}/pods/{name}");
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let (_, pod) = kube.request("GET", &path, None);
            if pod["status"]["phase"] == "Running"
                && pod["status"]["containerStatuses"][0]["ready"] == true
            {
                return pod;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} never ran: {}\nevents: {:?}\n{}",
                pod["status"],
                pod_events(kube, ns, name),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Where containerd reads per-registry `hosts.toml` files (`config_path`).
    pub fn hosts_dir(&self) -> PathBuf {
        self.path("certs.d")
    }

    /// The ends of the kubelet's, containerd's and every container's logs, for failure
    /// messages.
    pub fn logs(&self) -> String {
        let mut files = vec![self.path("kubelet.log"), self.path("containerd.log")];
        let mut dirs = vec![self.path("pod-logs")];
        while let Some(dir) = dirs.pop() {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "log") {
                    files.push(p);
                }
            }
        }
        files
            .iter()
            .map(|f| log_tail(f, 6_000))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for KubeNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        let _ = Command::new("bash")
            .arg(script("kube-test-node"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// What the kubelet said about pod `ns/name`: (reason, message) of its events, oldest first.
pub fn pod_events(kube: &KubeServer, ns: &str, name: &str) -> Vec<(String, String)> {
    let v = kube.ok(
        "GET",
        &format!("/api/v1/namespaces/{ns}/events?fieldSelector=involvedObject.name={name}"),
        None,
    );
    let mut events: Vec<(String, String, String)> = v["items"]
        .as_array()
        .expect("an event list")
        .iter()
        .map(|e| {
            (
                e["firstTimestamp"]
                    .as_str()
                    .or(e["eventTime"].as_str())
                    .unwrap_or("")
                    .to_owned(),
                e["reason"].as_str().unwrap_or("").to_owned(),
                e["message"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    events.sort();
    events.into_iter().map(|(_, r, m)| (r, m)).collect()
}

/// A directory under `root` (at most `depth` levels down) whose name contains `needle`.
fn find_dir(root: &Path, needle: &str, depth: usize) -> Option<PathBuf> {
    if depth == 0 {
        return None;
    }
    for e in std::fs::read_dir(root).ok()?.flatten() {
        let p = e.path();
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if e.file_name().to_string_lossy().contains(needle) {
            return Some(p);
        }
        if let Some(found) = find_dir(&p, needle, depth - 1) {
            return Some(found);
        }
    }
    None
}
