//! A `kache webhook` child process with a test CA, registered with a test API server.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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
    /// Starts a webhook with the pair in `dir` on :0, and waits until it says where it
    /// listens.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[])
    }

    /// [`Webhook::start`] with more flags (the policy's).
    pub fn start_with(dir: &Path, extra: &[&str]) -> Self {
        let ready = dir.join("webhook-ready.json");
        let _ = std::fs::remove_file(&ready);
        let mut child = Command::new(crate::kache_bin())
            .args(["webhook", "--listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--tls-cert")
            .arg(dir.join("tls.crt"))
            .arg("--tls-key")
            .arg(dir.join("tls.key"))
            .arg("--ready-file")
            .arg(&ready)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("webhook.log")).unwrap())
            .spawn()
            .unwrap();
        let bound = super::process::wait_ready_file(&mut child, &ready, Duration::from_secs(10))
            .unwrap_or_else(|e| {
                panic!(
                    "the webhook never listened ({e:?}): {}",
                    std::fs::read_to_string(dir.join("webhook.log")).unwrap_or_default()
                )
            });
        let addr = bound["listen"][0].to_string();
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
