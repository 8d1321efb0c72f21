//! The OCI clients nobody here wrote, as users run them against kache: crane, regctl and oras,
//! built by `scripts/oci-clients` (from the Go module proxy, cached in ~/.cache/kache). Every
//! registry they talk to here is plain HTTP on 127.0.0.1, and each runs with a home of its own
//! so that no credentials or settings of the machine reach it.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

use super::kube::script;

/// What one run printed, and how it ended.
#[derive(Debug)]
pub struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    fn of(o: Output) -> Ran {
        Ran {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Stdout, once the run succeeded; panics with what it said otherwise.
    pub fn out(&self, what: &str) -> &str {
        assert!(self.ok, "{what} failed:\n{}\n{}", self.stdout, self.stderr);
        &self.stdout
    }
}

/// The three clients.
#[derive(Debug)]
pub struct OciClients {
    crane: PathBuf,
    regctl: PathBuf,
    oras: PathBuf,
    home: tempfile::TempDir,
}

/// Where `scripts/oci-clients` put them: run once per test process.
fn built() -> &'static (PathBuf, PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = Command::new("bash")
            .arg(script("oci-clients"))
            .output()
            .expect("run scripts/oci-clients");
        assert!(
            out.status.success(),
            "scripts/oci-clients: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).expect("UTF-8");
        let find = |key: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("scripts/oci-clients printed no {key}"))
        };
        (
            find("KACHE_CRANE="),
            find("KACHE_REGCTL="),
            find("KACHE_ORAS="),
        )
    })
}

impl OciClients {
    /// The clients, built first if the test bed has not built them yet.
    pub fn new() -> Self {
        let (crane, regctl, oras) = built().clone();
        OciClients {
            crane,
            regctl,
            oras,
            home: tempfile::Builder::new()
                .prefix("kache-oci-clients")
                .tempdir()
                .expect("temp dir"),
        }
    }

    fn command(&self, bin: &PathBuf) -> Command {
        let mut c = Command::new(bin);
        c.current_dir(self.home.path())
            .env("HOME", self.home.path())
            .env("DOCKER_CONFIG", self.home.path().join(".docker"))
            .env("XDG_CONFIG_HOME", self.home.path().join(".config"))
            .env("NO_PROXY", "*")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy");
        c
    }

    /// `crane <args> --insecure`: plain HTTP allowed.
    pub fn crane(&self, args: &[&str]) -> Ran {
        let o = self
            .command(&self.crane)
            .args(args)
            .arg("--insecure")
            .output()
            .expect("run crane");
        Ran::of(o)
    }

    /// `regctl <args>`, with every host in `hosts` (`127.0.0.1:PORT`) reached without TLS.
    pub fn regctl(&self, hosts: &[&str], args: &[&str]) -> Ran {
        let mut c = self.command(&self.regctl);
        for h in hosts {
            c.arg("--host").arg(format!("reg={h},tls=disabled"));
        }
        Ran::of(c.args(args).output().expect("run regctl"))
    }

    /// `oras <args> --plain-http`.
    pub fn oras(&self, args: &[&str]) -> Ran {
        let o = self
            .command(&self.oras)
            .args(args)
            .arg("--plain-http")
            .output()
            .expect("run oras");
        Ran::of(o)
    }

    /// A file in this client's home (where they run), for what oras pushes and pulls.
    pub fn path(&self, name: &str) -> PathBuf {
        self.home.path().join(name)
    }
}

impl Default for OciClients {
    fn default() -> Self {
        Self::new()
    }
}
