//! A `kache webhook` child process with a test CA, registered with a test API server.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::json;

use super::kube::KubeServer;

pub use super::pki::{certificates, free_addr};

/// A `kache webhook` child process.
#[derive(Debug)]
pub struct Webhook {
    child: Child,
    pub addr: String,
}

impl Webhook {
    pub fn start(dir: &Path) -> Self {
        let (addr, metrics) = (free_addr(), free_addr());
        let child = Command::new(crate::kache_bin())
            .args(["webhook", "--listen", &addr, "--metrics-listen", &metrics])
            .arg("--tls-cert")
            .arg(dir.join("tls.crt"))
            .arg("--tls-key")
            .arg(dir.join("tls.key"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("webhook.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the webhook never listened on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Webhook { child, addr }
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Registers `webhook` for pod creation and ephemeral containers, as the chart does.
pub fn register(kube: &KubeServer, webhook: &Webhook, ca: &str) {
    kube.ok(
        "POST",
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
        Some(&json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "kache"},
            "webhooks": [{
                "name": "pods.kache.io",
                "clientConfig": {
                    "url": format!("https://{}/mutate", webhook.addr),
                    "caBundle": base64::engine::general_purpose::STANDARD.encode(ca),
                },
                "rules": [
                    {"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]},
                    {"operations": ["UPDATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods/ephemeralcontainers"]},
                ],
                "failurePolicy": "Ignore",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 5,
                "objectSelector": {"matchExpressions": [
                    {"key": "kache.io/image-caching-policy", "operator": "NotIn", "values": ["ignore"]},
                ]},
            }],
        })),
    );
}
