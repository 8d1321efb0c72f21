//! The helm CLI of the test bed (scripts/kube-test-server builds it from helm.sh/helm/v4) and
//! kache's chart, helm/kache. Every run has its own helm config, cache and data directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

use super::kube::{KubeServer, script};

/// helm, pointed at a test API server or at none (`template`, `lint`).
#[derive(Debug)]
pub struct Helm {
    bin: PathBuf,
    kubeconfig: Option<PathBuf>,
    home: TempDir,
}

/// The repository's chart.
pub fn chart() -> PathBuf {
    script("kube-test-server")
        .parent()
        .and_then(Path::parent)
        .expect("the repository")
        .join("helm/kache")
}

impl Helm {
    /// helm against `kube`, as its admin.
    pub fn new(kube: &KubeServer) -> Self {
        Helm::with(kube.helm.clone(), Some(kube.kubeconfig()))
    }

    /// helm without a cluster: builds it first if the test bed has not.
    pub fn offline() -> Self {
        let out = Command::new("bash")
            .arg(script("kube-test-server"))
            .arg("peers")
            .output()
            .expect("run scripts/kube-test-server peers");
        assert!(
            out.status.success(),
            "kube-test-server peers: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).expect("UTF-8");
        let bin = stdout
            .lines()
            .find_map(|l| l.strip_prefix("KUBE_HELM="))
            .expect("KUBE_HELM");
        Helm::with(PathBuf::from(bin), None)
    }

    fn with(bin: PathBuf, kubeconfig: Option<PathBuf>) -> Self {
        let home = tempfile::Builder::new()
            .prefix("kache-helm")
            .tempdir()
            .expect("temp dir");
        Helm {
            bin,
            kubeconfig,
            home,
        }
    }

    /// Runs helm with `args`.
    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Output {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("HELM_CONFIG_HOME", self.home.path().join("config"))
            .env("HELM_CACHE_HOME", self.home.path().join("cache"))
            .env("HELM_DATA_HOME", self.home.path().join("data"))
            .env_remove("KUBECONFIG");
        if let Some(k) = &self.kubeconfig {
            cmd.env("KUBECONFIG", k);
        }
        cmd.output().expect("run helm")
    }

    /// Runs helm; panics with its output unless it succeeds. Returns stdout.
    pub fn ok<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "helm {:?} failed:\n{}{}",
            args.iter()
                .map(|a| a.as_ref().to_owned())
                .collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8")
    }

    /// Runs helm; panics unless it fails. Returns stderr.
    pub fn fails<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "helm {:?} succeeded:\n{}",
            args.iter()
                .map(|a| a.as_ref().to_owned())
                .collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).expect("UTF-8")
    }

    /// `helm template kache <chart> -n kache` with `args` added (`--set`, `-f`, ...).
    pub fn template(&self, args: &[&str]) -> String {
        let chart = chart();
        let mut all = vec![
            "template",
            "kache",
            chart.to_str().expect("UTF-8 path"),
            "-n",
            "kache",
        ];
        all.extend_from_slice(args);
        self.ok(&all)
    }
}

/// The controller's ServiceAccount and RBAC, as the chart makes them for a release `kache` in
/// the namespace `kache` (the chart is where they live).
pub fn controller_rbac(kube: &KubeServer) -> String {
    controller_rbac_with(kube, &[])
}

/// [`controller_rbac`] rendered with more values (`--set` flags).
pub fn controller_rbac_with(kube: &KubeServer, values: &[&str]) -> String {
    let mut args = vec![
        "--show-only",
        "templates/serviceaccounts.yaml",
        "--show-only",
        "templates/controller-rbac.yaml",
    ];
    args.extend_from_slice(values);
    Helm::new(kube).template(&args)
}

/// Fails unless none of the collections at `paths` holds an object of the release `kache`.
pub fn assert_release_gone(kube: &KubeServer, paths: &[&str]) {
    for path in paths {
        let left = kube.ok(
            "GET",
            &format!("{path}?labelSelector=app.kubernetes.io/instance%3Dkache"),
            None,
        );
        assert_eq!(
            left["items"],
            serde_json::json!([]),
            "{path} still holds the release's objects"
        );
    }
}
