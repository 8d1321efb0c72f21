//! A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager and, on the
//! current version, kube-scheduler) on 127.0.0.1, started by `scripts/kube-test-server`, which
//! builds and caches the binaries of the two versions the tests run against.
//!
//! Requests go through curl: the API server's certificate is signed by a test CA, and curl
//! needs no TLS stack in the test binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;

/// The Kubernetes versions of the test bed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// 1.20, the oldest kache supports: `pods/ephemeralcontainers` takes an EphemeralContainers
    /// object, CronJobs are `batch/v1beta1`, ServiceAccounts get token Secrets.
    Oldest,
    /// A current release (1.34): ephemeral containers are updated as a Pod, CronJobs are
    /// `batch/v1`, tokens come only from the TokenRequest API.
    Current,
}

impl Version {
    pub const ALL: [Version; 2] = [Version::Oldest, Version::Current];

    /// The name `scripts/kube-test-server` knows it by.
    pub fn name(self) -> &'static str {
        match self {
            Version::Oldest => "oldest",
            Version::Current => "current",
        }
    }
}

/// A running test API server; stopped on drop.
#[derive(Debug)]
pub struct KubeServer {
    dir: TempDir,
    pub version: Version,
    /// `https://127.0.0.1:<port>`.
    pub api: String,
    pub token: String,
    pub ca: PathBuf,
    /// Where the version's binaries are (and, for the current one, the `pause` program).
    pub bin: PathBuf,
    /// The helm CLI of the test bed.
    pub helm: PathBuf,
    /// cert-manager's build: `bin/{controller,webhook,cainjector}` and `chart/`.
    pub cert_manager: PathBuf,
}

/// The objects of a multi-document YAML text (split at `---` lines; empty documents left out).
pub fn documents(text: &str) -> Vec<Value> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else {
            let doc = docs.last_mut().expect("one document at least");
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.iter()
        .filter_map(|doc| {
            let v: Value = serde_yaml::from_str(doc).expect("YAML");
            (!v.is_null()).then_some(v)
        })
        .collect()
}

/// The API path that creates `object`: its group-version, namespace and plural resource name.
pub fn collection_path(object: &Value) -> String {
    let api = match object["apiVersion"].as_str().expect("apiVersion") {
        "v1" => "/api/v1".to_owned(),
        gv => format!("/apis/{gv}"),
    };
    let kind = object["kind"].as_str().expect("kind").to_lowercase();
    let plural = match kind.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None => format!("{kind}s"),
    };
    match object["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{api}/namespaces/{ns}/{plural}"),
        None => format!("{api}/{plural}"),
    }
}

/// `scripts/<name>` of the repository (this file is compiled into the tests and the benchmark,
/// from different package directories).
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|d| d.join("scripts").join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "scripts/{name} not found above {}",
                env!("CARGO_MANIFEST_DIR")
            )
        })
}

impl KubeServer {
    /// Starts the control plane of `version`; waits until the API is ready.
    pub fn start(version: Version) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kache-kube")
            .tempdir()
            .expect("temp dir");
        let out = Command::new("bash")
            .arg(script("kube-test-server"))
            .arg("start")
            .arg(dir.path())
            .env("KACHE_K8S_VERSION", version.name())
            .output()
            .expect("run scripts/kube-test-server");
        if !out.status.success() {
            let logs = ["etcd.log", "apiserver.log"]
                .iter()
                .map(|f| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n");
            panic!(
                "kube-test-server start failed:\n{}\n{}\n{logs}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let env = std::fs::read_to_string(dir.path().join("env")).expect("env file");
        let get = |k: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{k} missing from env"))
                .to_owned()
        };
        KubeServer {
            api: get("KUBE_APISERVER"),
            token: get("KUBE_TOKEN"),
            ca: PathBuf::from(get("KUBE_CA")),
            bin: PathBuf::from(get("KUBE_BIN")),
            helm: PathBuf::from(get("KUBE_HELM")),
            cert_manager: PathBuf::from(get("KUBE_CERT_MANAGER")),
            version,
            dir,
        }
    }

    /// The directory the control plane (and a node, see [`super::node`]) keeps its files in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The kubeconfig of the admin user.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// One API request; returns the status and the JSON body (Null when empty or not JSON).
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "30",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
        ])
        .arg("--cacert")
        .arg(&self.ca)
        .arg("-H")
        .arg(format!("Authorization: Bearer {}", self.token));
        if let Some(b) = body {
            let ct = if method == "PATCH" {
                "application/merge-patch+json"
            } else {
                "application/json"
            };
            cmd.arg("-H")
                .arg(format!("Content-Type: {ct}"))
                .arg("--data-binary")
                .arg(b.to_string());
        }
        let out = cmd
            .arg(format!("{}{path}", self.api))
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let status = code.trim().parse().unwrap_or_else(|_| {
            panic!(
                "curl {method} {path}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    /// `GET path` as a server-side printed Table (what kubectl shows): the column names and
    /// each row's cells as strings.
    pub fn table(&self, path: &str) -> (Vec<String>, Vec<Vec<String>>) {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "30"])
            .arg("--cacert")
            .arg(&self.ca)
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", self.token))
            .arg("-H")
            .arg("Accept: application/json;as=Table;v=v1;g=meta.k8s.io")
            .arg(format!("{}{path}", self.api))
            .output()
            .expect("run curl");
        assert!(
            out.status.success(),
            "GET {path} as a Table: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("a Table");
        let columns = v["columnDefinitions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["name"].as_str().unwrap_or("").to_owned())
            .collect();
        let cell = |c: &Value| match c {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        let rows = v["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                r["cells"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(cell)
                    .collect()
            })
            .collect();
        (columns, rows)
    }

    /// Like [`request`](Self::request), failing the test unless the status is 2xx.
    pub fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, v) = self.request(method, path, body);
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {v}"
        );
        v
    }

    /// Polls `check` on `GET path` until it returns Some, for at most `timeout`.
    pub fn wait_for<T>(
        &self,
        path: &str,
        timeout: Duration,
        mut check: impl FnMut(u16, &Value) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, v) = self.request("GET", path, None);
            if let Some(t) = check(status, &v) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "GET {path} never met the condition; last: {status} {v}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Creates a namespace and waits for its default ServiceAccount (pods need it).
    pub fn namespace(&self, name: &str) {
        self.ok("POST", "/api/v1/namespaces", Some(&serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})));
        self.wait_for(
            &format!("/api/v1/namespaces/{name}/serviceaccounts/default"),
            Duration::from_secs(60),
            |s, v| {
                // 1.20 adds the token volume only once the token Secret exists; 1.24 and later
                // make no such Secret (pods get a projected token).
                let ready = match self.version {
                    Version::Oldest => v["secrets"].as_array().is_some_and(|a| !a.is_empty()),
                    Version::Current => true,
                };
                (s == 200 && ready).then_some(())
            },
        );
    }

    /// Creates every object of a multi-document YAML file.
    pub fn apply_yaml(&self, text: &str) {
        for v in documents(text) {
            self.ok("POST", &collection_path(&v), Some(&v));
        }
    }

    /// Sends every object of a multi-document YAML file to the API server as a server-side dry
    /// run of its creation (admission and validation included, nothing stored); returns what was
    /// refused, as `Kind/name: message`.
    pub fn dry_run_yaml(&self, text: &str) -> Vec<String> {
        documents(text)
            .into_iter()
            .filter_map(|v| {
                let path = format!("{}?dryRun=All&fieldValidation=Strict", collection_path(&v));
                let (code, answer) = self.request("POST", &path, Some(&v));
                (code != 201 && code != 200).then(|| {
                    format!(
                        "{}/{}: {code} {}",
                        v["kind"].as_str().unwrap_or("?"),
                        v["metadata"]["name"].as_str().unwrap_or("?"),
                        answer["message"].as_str().unwrap_or(&answer.to_string())
                    )
                })
            })
            .collect()
    }

    /// The CA bundle (PEM) the API server trusts for the first webhook of a
    /// MutatingWebhookConfiguration; empty when it has none yet.
    pub fn webhook_ca_bundle(&self, configuration: &str) -> String {
        use base64::Engine as _;
        let (_, w) = self.request(
            "GET",
            &format!(
                "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{configuration}"
            ),
            None,
        );
        let b64 = w["webhooks"][0]["clientConfig"]["caBundle"]
            .as_str()
            .unwrap_or("");
        let pem = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("a base64 caBundle");
        String::from_utf8(pem).expect("a PEM caBundle")
    }

    /// Creates a one-replica Deployment `name` of `image` in `ns` (label `app: <name>`) and
    /// returns its first pod, as admitted.
    pub fn deployment(&self, ns: &str, name: &str, image: &str, timeout: Duration) -> Value {
        self.ok(
            "POST",
            &format!("/apis/apps/v1/namespaces/{ns}/deployments"),
            Some(&serde_json::json!({
                "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": name}},
                    "template": {"metadata": {"labels": {"app": name}}, "spec": {
                        "terminationGracePeriodSeconds": 0,
                        "containers": [{"name": "app", "image": image}],
                    }},
                },
            })),
        );
        self.wait_for(
            &format!("/api/v1/namespaces/{ns}/pods?labelSelector=app%3D{name}"),
            timeout,
            |_, v| v["items"].as_array()?.first().cloned(),
        )
    }

    /// A kubeconfig at `out` that authenticates as the ServiceAccount `ns/name`, with a token
    /// from the TokenRequest API (every supported version serves it).
    pub fn service_account_kubeconfig(&self, ns: &str, name: &str, out: &Path) -> PathBuf {
        let path = format!("/api/v1/namespaces/{ns}/serviceaccounts/{name}");
        self.wait_for(&path, Duration::from_secs(60), |s, _| {
            (s == 200).then_some(())
        });
        let v = self.ok(
            "POST",
            &format!("{path}/token"),
            Some(&serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"expirationSeconds": 86400},
            })),
        );
        let token = v["status"]["token"].as_str().expect("a token").to_owned();
        let admin = std::fs::read_to_string(self.kubeconfig()).expect("kubeconfig");
        assert!(admin.contains(&self.token));
        std::fs::write(out, admin.replace(&self.token, &token)).expect("write kubeconfig");
        out.to_owned()
    }

    /// Kills the API server (SIGKILL) and starts it again on the same port with the same etcd;
    /// returns once it is ready.
    pub fn restart_apiserver(&self) {
        let out = Command::new("bash")
            .arg(script("kube-test-server"))
            .arg("restart-apiserver")
            .arg(self.dir.path())
            .output()
            .expect("run scripts/kube-test-server");
        assert!(
            out.status.success(),
            "restart-apiserver failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
    }

    /// The logs of the control plane, for failure messages.
    pub fn logs(&self) -> String {
        ["apiserver.log", "controller-manager.log", "scheduler.log"]
            .iter()
            .map(|f| log_tail(&self.dir.path().join(f), 8000))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The last `bytes` (about) of a log file under a header naming it, for failure messages.
pub fn log_tail(path: &Path, bytes: usize) -> String {
    let t = std::fs::read_to_string(path).unwrap_or_default();
    let start = (t.len().saturating_sub(bytes)..t.len())
        .find(|&i| t.is_char_boundary(i))
        .unwrap_or(t.len());
    format!("----- {} -----\n{}", path.display(), &t[start..])
}

impl Drop for KubeServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        let _ = Command::new("bash")
            .arg(script("kube-test-server"))
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// The upstream as `<this host's name>:<port>`: the webhook leaves loopback registries
/// (`127.0.0.1`, `localhost`) alone, as a node-local registry has nothing to cache, so the pods
/// must name the upstream by a name; the machine's own resolves to loopback in /etc/hosts.
pub fn non_loopback_name(addr: &str) -> String {
    use std::net::ToSocketAddrs;
    let name = String::from_utf8(Command::new("hostname").output().unwrap().stdout).unwrap();
    let name = name.trim();
    let port = addr.rsplit_once(':').unwrap().1;
    let host = format!("{name}:{port}");
    let resolved: Vec<_> = host
        .to_socket_addrs()
        .map(|a| a.collect())
        .unwrap_or_default();
    assert!(
        !name.is_empty()
            && name != "localhost"
            && resolved
                .iter()
                .any(|a: &std::net::SocketAddr| a.ip().is_loopback()),
        "this test needs the host name ({name:?}) to resolve to 127.0.0.1 (/etc/hosts): {resolved:?}"
    );
    host
}

/// A `kubernetes.io/dockerconfigjson` Secret with one registry's credentials, as
/// `kubectl create secret docker-registry` makes it.
pub fn pull_secret(name: &str, host: &str, user: &str, password: &str) -> Value {
    use base64::Engine as _;
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    let config = json!({"auths": {host: {"auth": b64(format!("{user}:{password}").as_bytes())}}});
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
        "metadata": {"name": name},
        "data": {".dockerconfigjson": b64(config.to_string().as_bytes())},
    })
}
