//! A `kache registry` child process on 127.0.0.1, for tests that talk to it like a client would.

use crate::process::{self, NotServing, Stopped};
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

/// How long a started registry has to answer `GET /v2/` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopped registry has to exit on SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `kache registry --listen 127.0.0.1:P --data-dir D --metrics-listen 127.0.0.1:Q`.
///
/// The child is killed when this is dropped. Its stdout and stderr go to a log file whose tail is
/// printed when it is dropped during a panic, so a failing test shows what the registry said.
#[derive(Debug)]
pub struct KacheRegistry {
    data_dir: PathBuf,
    extra_args: Vec<OsString>,
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    /// `--internal-listen`, when started with one.
    internal_addr: Option<SocketAddr>,
    child: Option<Child>,
    log_path: PathBuf,
    /// Kept (not deleted) when dropped during a panic, for reading the whole log.
    log_dir: Option<TempDir>,
}

impl KacheRegistry {
    /// Starts a registry on `data_dir` and waits until it serves `/v2/`.
    pub fn start(data_dir: impl AsRef<Path>) -> Self {
        Self::start_with_args(data_dir, &[] as &[&str])
    }

    /// Like [`start`](Self::start), with extra command-line arguments after the standard ones
    /// (kept for every restart).
    pub fn start_with_args<S: AsRef<std::ffi::OsStr>>(
        data_dir: impl AsRef<Path>,
        extra_args: &[S],
    ) -> Self {
        Self::start_inner(data_dir.as_ref(), extra_args, false)
    }

    /// Like [`start_with_args`](Self::start_with_args), with `--internal-listen` on another
    /// free port of 127.0.0.1: the listener that takes writes without a token.
    pub fn start_with_internal<S: AsRef<std::ffi::OsStr>>(
        data_dir: impl AsRef<Path>,
        extra_args: &[S],
    ) -> Self {
        Self::start_inner(data_dir.as_ref(), extra_args, true)
    }

    fn start_inner<S: AsRef<std::ffi::OsStr>>(
        data_dir: &Path,
        extra_args: &[S],
        internal: bool,
    ) -> Self {
        let log_dir = tempfile::Builder::new()
            .prefix("kache-registry-log")
            .tempdir()
            .expect("create log dir");
        // Every listener on :0: the registry says where it put them (--ready-file).
        let any: SocketAddr = "127.0.0.1:0".parse().expect("an address");
        let mut registry = KacheRegistry {
            data_dir: data_dir.to_path_buf(),
            extra_args: extra_args.iter().map(|a| a.as_ref().to_owned()).collect(),
            addr: any,
            metrics_addr: any,
            internal_addr: internal.then_some(any),
            child: None,
            log_path: log_dir.path().join("kache-registry.log"),
            log_dir: Some(log_dir),
        };
        registry.spawn();
        registry
    }

    /// The API listener, e.g. `127.0.0.1:40123`: the host part of image references.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The internal listener's address, when started with one.
    pub fn internal_addr(&self) -> Option<SocketAddr> {
        self.internal_addr
    }

    /// `http://127.0.0.1:PORT` of the internal listener; fails the test if there is none.
    pub fn internal_url(&self) -> String {
        let addr = self
            .internal_addr
            .expect("started without an internal listener: use start_with_internal");
        format!("http://{addr}")
    }

    /// The metrics listener's address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// `http://127.0.0.1:PORT/metrics` on the metrics listener.
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.metrics_addr)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The process id of the running child, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the registry has written to stdout and stderr so far, across restarts.
    pub fn logs(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Kills the child with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::kill(&mut child);
            self.note("killed with SIGKILL");
        }
    }

    /// Stops the child the way Kubernetes does (SIGTERM, so it shuts down cleanly), with
    /// SIGKILL if it has not exited within a bound, and reaps it; the data dir stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            match process::terminate(&mut child, STOP_TIMEOUT) {
                Stopped::Exited(status) => self.note(&format!("stopped with SIGTERM: {status}")),
                Stopped::Killed => self.note(&format!(
                    "no exit within {STOP_TIMEOUT:?} of SIGTERM; killed"
                )),
            }
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the registry again on the same data dir, addresses and arguments (killing it
    /// first if it still runs), and waits until it serves `/v2/`.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "registry already running");
        let mut command = process::kache_logged("registry", &self.log_path);
        command
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--metrics-listen")
            .arg(self.metrics_addr.to_string());
        if let Some(internal) = self.internal_addr {
            command.arg("--internal-listen").arg(internal.to_string());
        }
        // No free-space floor unless a test asks for one: the machine's disk is not the test's.
        if !self.extra_args.iter().any(|a| a == "--min-free") {
            command.arg("--min-free=0");
        }
        command.args(&self.extra_args);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let ready_file = self.log_path.with_file_name("ready.json");
        let _ = std::fs::remove_file(&ready_file);
        command.arg("--ready-file").arg(&ready_file);
        self.note(&format!("starting {command:?}"));
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
        self.child = Some(child);
        // Where it listens: the same addresses on a restart, the system's choice on :0.
        let child = self.child.as_mut().expect("child is running");
        match process::wait_ready_file(child, &ready_file, READY_TIMEOUT) {
            Ok(bound) => {
                let first = |name: &str| bound.get(name).and_then(|a| a.first().copied());
                self.addr = first("listen").expect("the registry's listener");
                self.metrics_addr = first("metrics").expect("the metrics listener");
                if self.internal_addr.is_some() {
                    self.internal_addr = first("internal");
                }
            }
            Err(NotServing::Exited(status)) => {
                self.child = None;
                panic!("kache registry exited with {status} before it listened (log below)");
            }
            Err(NotServing::Silent(why)) => panic!("kache registry never listened: {why}"),
        }
        self.wait_ready();
    }

    /// Polls `GET /v2/` until it answers 200 (or, with private-image scoping, the challenge),
    /// the child exits, or [`READY_TIMEOUT`] passes.
    fn wait_ready(&mut self) {
        let url = format!("{}/v2/", self.base_url());
        let child = self.child.as_mut().expect("child is running");
        match process::wait_serving(child, &url, READY_TIMEOUT, |s| s == 200 || s == 401) {
            Ok(()) => {}
            Err(NotServing::Exited(status)) => {
                self.child = None;
                panic!("kache registry exited with {status} before serving {url} (log below)");
            }
            Err(NotServing::Silent(last)) => panic!(
                "kache registry did not answer 200 on {url} within {READY_TIMEOUT:?} \
                 (last: {last}; log below)"
            ),
        }
    }

    /// Marks an event in the log, so restarts are visible when reading it.
    fn note(&self, what: &str) {
        if let Ok(mut f) = OpenOptions::new().append(true).open(&self.log_path) {
            let _ = writeln!(f, "===== test harness: {what}");
        }
    }

    /// The last 64 KiB of the log, framed for test output.
    fn log_tail(&self) -> String {
        let logs = self.logs();
        let mut start = logs.len().saturating_sub(64 * 1024);
        while !logs.is_char_boundary(start) {
            start += 1;
        }
        format!(
            "----- kache registry log ({}) -----\n{}\n----- end of log -----",
            self.log_path.display(),
            &logs[start..]
        )
    }
}

impl Drop for KacheRegistry {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
            if let Some(dir) = self.log_dir.take() {
                eprintln!("(registry log kept in {})", dir.keep().display());
            }
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago: bind port 0, read it, release it.
pub fn free_local_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr")
}

/// What `kache fsck --data-dir DIR` said about a stopped store.
#[derive(Debug)]
pub struct FsckReport {
    pub success: bool,
    pub output: String,
    /// From its `blobs: N  bytes: M  bad: K` line.
    pub blobs: u64,
    pub bytes: u64,
    pub bad: u64,
    /// `(checked, total)` of each `fsck: checked A of B blobs` line on stderr, in order.
    pub progress: Vec<(u64, u64)>,
}

/// Runs `kache fsck --data-dir data_dir` (the registry on it must be stopped) and reads its
/// summary line; fails the test if there is none.
pub fn fsck(data_dir: &Path) -> FsckReport {
    let out = Command::new(crate::kache_bin())
        .arg("fsck")
        .arg("--data-dir")
        .arg(data_dir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run kache fsck");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = output
        .lines()
        .find(|l| l.starts_with("blobs:"))
        .unwrap_or_else(|| panic!("kache fsck printed no summary:\n{output}"));
    let field = |name: &str| -> u64 {
        let mut words = summary.split_whitespace();
        words
            .by_ref()
            .find(|w| *w == name)
            .and_then(|_| words.next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in fsck summary {summary:?}"))
    };
    let progress = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("fsck: checked ")?;
            let mut words = rest.split_whitespace();
            let checked = words.next()?.parse().ok()?;
            let total = words.nth(1)?.parse().ok()?;
            Some((checked, total))
        })
        .collect();
    FsckReport {
        success: out.status.success(),
        progress,
        blobs: field("blobs:"),
        bytes: field("bytes:"),
        bad: field("bad:"),
        output,
    }
}

/// Every blob file of a store (`<data>/blobs/sha256/<xx>/<hex>`) by digest, with its size,
/// each re-hashed: fails the test if a file's bytes do not match its name. Files are renamed
/// into place only once verified, so this may run while the registry serves.
pub fn stored_blobs(data_dir: &Path) -> std::collections::BTreeMap<String, u64> {
    use sha2::{Digest as _, Sha256};
    let mut out = std::collections::BTreeMap::new();
    let root = data_dir.join("blobs/sha256");
    let Ok(shards) = std::fs::read_dir(&root) else {
        return out;
    };
    for shard in shards {
        let shard = shard.expect("read blob shard");
        for file in std::fs::read_dir(shard.path()).expect("read blob shard dir") {
            let file = file.expect("read blob entry");
            let path = file.path();
            let name = file.file_name().to_string_lossy().into_owned();
            let mut hasher = Sha256::new();
            let mut f = std::fs::File::open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            let size = std::io::copy(&mut f, &mut hasher)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            let actual = hex::encode(hasher.finalize());
            assert_eq!(
                actual,
                name,
                "{} holds bytes that hash to sha256:{actual}",
                path.display()
            );
            out.insert(format!("sha256:{name}"), size);
        }
    }
    out
}
