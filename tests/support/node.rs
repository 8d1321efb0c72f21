//! A real node (kubelet, containerd's CRI, runc, bridge CNI) beside a test control plane, started
//! by `scripts/kube-test-node`, and the kache image that runs on it, as `scripts/build-image`
//! makes it. A node needs root and the current Kubernetes version.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::kube::KubeServer;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts")
        .join(name)
}

/// Packages this test build of kache with `scripts/build-image` into `out` under `name`;
/// returns the manifest digest it printed. `out/kache-image.tar` is the archive.
pub fn build_kache_image(out: &Path, name: &str) -> String {
    let o = Command::new(script("build-image"))
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_kache"))
        .arg("--out")
        .arg(out)
        .arg("--name")
        .arg(name)
        .output()
        .expect("run scripts/build-image");
    assert!(
        o.status.success(),
        "build-image failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap().trim().to_owned()
}

/// The node `127.0.0.1`; stopped on drop (declare it after the [`KubeServer`], so that it
/// stops first).
#[derive(Debug)]
pub struct KubeNode {
    /// The control plane's directory; the node's files are in `node/`.
    dir: PathBuf,
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
        let node = KubeNode { dir };
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

    /// Whether containerd holds the blob `digest` in its content store.
    pub fn has_content(&self, digest: &str) -> bool {
        self.ctr_ok(&["content", "ls", "-q"])
            .lines()
            .any(|l| l == digest)
    }

    /// Makes the node forget every image whose name starts with `prefix` (by name and by the
    /// digest names the CRI adds), content included: the next pod has to pull it again.
    pub fn forget(&self, prefix: &str) {
        let ids: Vec<String> = self
            .ctr_ok(&["images", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| {
                let mut cols = l.split_whitespace();
                let name = cols.next()?;
                let digest = cols.nth(1)?;
                name.starts_with(prefix).then(|| digest.to_owned())
            })
            .collect();
        let names: Vec<String> = self
            .ctr_ok(&["images", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| {
                let mut cols = l.split_whitespace();
                let name = cols.next()?;
                let digest = cols.nth(1)?;
                (name.starts_with(prefix)
                    || ids.iter().any(|d| d == digest) && name.starts_with("sha256:"))
                .then(|| name.to_owned())
            })
            .collect();
        if names.is_empty() {
            return;
        }
        let mut args = vec!["images", "rm", "--sync"];
        args.extend(names.iter().map(String::as_str));
        self.ctr_ok(&args);
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
            .map(|f| {
                let t = std::fs::read_to_string(f).unwrap_or_default();
                let start = (t.len().saturating_sub(6_000)..t.len())
                    .find(|&i| t.is_char_boundary(i))
                    .unwrap_or(t.len());
                format!("----- {} -----\n{}", f.display(), &t[start..])
            })
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
