//! A private containerd (Debian's package, 1.6) for pulling images the way a Kubernetes node
//! does, and `ctr images pull --hosts-dir` with containerd's `certs.d/<host>/hosts.toml` mirror
//! configuration (registry-mirror mode).
//!
//! containerd needs root (it mounts snapshots and owns its state), so tests using it first call
//! [`skip_unless_root`]. Its root, state, sockets and config live in a temp dir, and the CRI
//! plugin is disabled: only the content, image and snapshot services are used.

use std::fs::OpenOptions;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::process::{Ran, run_bounded};

/// How long containerd has to answer `ctr version` after starting.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound on one `ctr` command.
const CTR_TIMEOUT: Duration = Duration::from_secs(300);
/// How long containerd gets to exit on SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The containerd namespace the tests' images live in.
const NAMESPACE: &str = "kache-test";

/// The effective user id of this process (the owner of `/proc/self`).
pub fn effective_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .expect("stat /proc/self")
        .uid()
}

/// True when a test needing containerd cannot run here (not root); it prints why. Use as
/// `if skip_unless_root("my_test") { return; }`.
pub fn skip_unless_root(test: &str) -> bool {
    let uid = effective_uid();
    if uid == 0 {
        return false;
    }
    eprintln!(
        "SKIPPED {test}: containerd must run as root (this process has uid {uid}); \
         run the tests as root to include it"
    );
    true
}

/// Writes `<hosts_dir>/<registry_host>/hosts.toml` so that pulls of `<registry_host>/...` go
/// to `mirror` first (plain HTTP, pull and resolve) and to `server` after it. Both are URLs
/// such as `http://127.0.0.1:5000`. Returns the file's path.
pub fn write_hosts_toml(
    hosts_dir: &Path,
    registry_host: &str,
    server: &str,
    mirror: &str,
) -> PathBuf {
    let dir = hosts_dir.join(registry_host);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let q = |s: &str| serde_json::to_string(s).expect("quote TOML string");
    let toml = format!(
        "server = {}\n\n[host.{}]\n  capabilities = [\"pull\", \"resolve\"]\n",
        q(server),
        q(mirror)
    );
    let path = dir.join("hosts.toml");
    std::fs::write(&path, toml).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// One image in containerd's image store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtrImage {
    pub name: String,
    pub media_type: String,
    /// The digest of the manifest or index the name points at.
    pub digest: String,
}

/// A running containerd; stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Containerd {
    child: Option<Child>,
    /// Kept (not deleted) when dropped during a panic, for reading the log.
    dir: Option<TempDir>,
    root: PathBuf,
}

impl Containerd {
    /// Starts containerd with its own config, root, state and socket, and waits until it answers.
    pub fn start() -> Self {
        assert_eq!(
            effective_uid(),
            0,
            "containerd needs root: call support::containerd::skip_unless_root first"
        );
        // Unix socket paths are limited to 108 bytes: keep the dir name short.
        let dir = tempfile::Builder::new()
            .prefix("kache-ctd")
            .tempdir()
            .expect("create containerd dir");
        let root = dir.path().to_path_buf();
        let p = |name: &str| {
            let path = root.join(name);
            serde_json::to_string(path.to_str().expect("temp paths are UTF-8")).expect("quote")
        };
        // The snapshotters that cannot work here are disabled to keep the log readable.
        let config = format!(
            r#"version = 2
root = {root}
state = {state}
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = {sock}

[ttrpc]
  address = {ttrpc}

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = {opt}
"#,
            root = p("root"),
            state = p("state"),
            sock = p("containerd.sock"),
            ttrpc = p("containerd.sock.ttrpc"),
            opt = p("opt"),
        );
        std::fs::write(root.join("config.toml"), config).expect("write containerd config");

        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("containerd.log"))
            .expect("open containerd log");
        let mut command = Command::new("containerd");
        command
            .arg("--config")
            .arg(root.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        let child = command.spawn().unwrap_or_else(|e| {
            panic!("cannot run containerd (is it installed? apt-get install containerd): {e}")
        });
        let mut containerd = Containerd {
            child: Some(child),
            dir: Some(dir),
            root,
        };
        containerd.wait_ready();
        containerd
    }

    pub fn socket(&self) -> PathBuf {
        self.root.join("containerd.sock")
    }

    /// A fresh directory under containerd's temp dir, e.g. for a `certs.d` hosts dir.
    pub fn scratch_dir(&self, name: &str) -> PathBuf {
        let dir = self.root.join("scratch").join(name);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        dir
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.join("containerd.log")
    }

    pub fn logs(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Runs `ctr --address <socket> --namespace kache-test <args>` and returns how it ended.
    pub fn ctr(&self, args: &[&str]) -> Ran {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(NAMESPACE)
            .args(args);
        run_bounded(command, &self.root, CTR_TIMEOUT)
    }

    /// `ctr images pull --hosts-dir <hosts_dir> <image_ref>`: resolves and fetches through
    /// the hosts.toml configuration there, then unpacks into the default snapshotter.
    pub fn try_pull(&self, image_ref: &str, hosts_dir: &Path) -> Ran {
        let hosts_dir = hosts_dir.to_str().expect("hosts dir is UTF-8");
        self.ctr(&["images", "pull", "--hosts-dir", hosts_dir, image_ref])
    }

    /// [`try_pull`](Self::try_pull) that fails the test, with ctr's output, unless it succeeds
    /// (containerd's log follows when it is dropped during the panic).
    pub fn pull(&self, image_ref: &str, hosts_dir: &Path) -> Ran {
        let out = self.try_pull(image_ref, hosts_dir);
        assert!(
            out.success(),
            "ctr images pull {image_ref} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            out.stdout,
            out.stderr
        );
        out
    }

    /// The images containerd holds (`ctr images ls`).
    pub fn images(&self) -> Vec<CtrImage> {
        let out = self.ctr(&["images", "ls"]);
        assert!(out.success(), "ctr images ls failed: {}", out.stderr);
        // Columns: REF TYPE DIGEST SIZE PLATFORMS LABELS, separated by whitespace.
        out.stdout
            .lines()
            .skip(1)
            .filter_map(|line| {
                let mut cols = line.split_whitespace();
                Some(CtrImage {
                    name: cols.next()?.to_owned(),
                    media_type: cols.next()?.to_owned(),
                    digest: cols.next()?.to_owned(),
                })
            })
            .collect()
    }

    /// The image named `name`, if containerd has it.
    pub fn image(&self, name: &str) -> Option<CtrImage> {
        self.images().into_iter().find(|i| i.name == name)
    }

    /// `ctr images rm <name>`: forget an image (its content goes at containerd's next GC).
    pub fn remove_image(&self, name: &str) {
        let out = self.ctr(&["images", "rm", "--sync", name]);
        assert!(out.success(), "ctr images rm {name} failed: {}", out.stderr);
    }

    /// Stops containerd: SIGTERM, then SIGKILL if it has not exited within a bound.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::process::terminate(&mut child, STOP_TIMEOUT);
        }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("not started");
        while Instant::now() < deadline {
            let child = self.child.as_mut().expect("child is running");
            if let Some(status) = child.try_wait().expect("poll child") {
                self.child = None;
                panic!("containerd exited with {status} at start:\n{}", self.logs());
            }
            if self.socket().exists() {
                let out = self.ctr(&["version"]);
                if out.success() {
                    return;
                }
                last = out.stderr;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "containerd did not answer within {READY_TIMEOUT:?} (last: {last}):\n{}",
            self.logs()
        );
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let logs = self.logs();
            let mut start = logs.len().saturating_sub(32 * 1024);
            while !logs.is_char_boundary(start) {
                start += 1;
            }
            eprintln!(
                "----- containerd log ({}) -----\n{}\n----- end of log -----",
                self.log_path().display(),
                &logs[start..]
            );
            if let Some(dir) = self.dir.take() {
                eprintln!("(containerd dir kept in {})", dir.keep().display());
            }
        }
    }
}
