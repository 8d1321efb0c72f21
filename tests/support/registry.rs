//! A `kache registry` child process on 127.0.0.1, for tests that talk to it like a client would.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a started registry has to answer `GET /v2/` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

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
        let log_dir = tempfile::Builder::new()
            .prefix("kache-registry-log")
            .tempdir()
            .expect("create log dir");
        // Both bound at once, so the two ports differ.
        let api = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let metrics = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let mut registry = KacheRegistry {
            data_dir: data_dir.as_ref().to_path_buf(),
            extra_args: extra_args.iter().map(|a| a.as_ref().to_owned()).collect(),
            addr: api.local_addr().expect("local addr"),
            metrics_addr: metrics.local_addr().expect("local addr"),
            child: None,
            log_path: log_dir.path().join("kache-registry.log"),
            log_dir: Some(log_dir),
        };
        drop((api, metrics));
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
            // std's Child::kill is SIGKILL on Unix.
            let _ = child.kill();
            let _ = child.wait();
            self.note("killed with SIGKILL");
        }
    }

    /// Starts the registry again on the same data dir, addresses and arguments (killing it
    /// first if it still runs), and waits until it serves `/v2/`.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "registry already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open registry log");
        let stdout = log.try_clone().expect("clone log handle");
        let mut command = Command::new(env!("CARGO_BIN_EXE_kache"));
        command
            .arg("registry")
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--metrics-listen")
            .arg(self.metrics_addr.to_string())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        // The log is a file: colour escapes only get in the way of reading it.
        command.env("NO_COLOR", "1");
        self.note(&format!("starting {command:?}"));
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
        self.child = Some(child);
        self.wait_ready();
    }

    /// Polls `GET /v2/` until it answers 200, the child exits, or [`READY_TIMEOUT`] passes.
    fn wait_ready(&mut self) {
        let url = format!("{}/v2/", self.base_url());
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            let child = self.child.as_mut().expect("child is running");
            if let Some(status) = child.try_wait().expect("poll child") {
                self.child = None;
                panic!("kache registry exited with {status} before serving {url} (log below)");
            }
            // One poll must not outlast the deadline if the server accepts but never answers.
            let timeout = Duration::from_secs(1);
            match super::http::try_request_within(timeout, "GET", &url, &[], &[]) {
                Ok(r) if r.status == 200 => return,
                Ok(r) => last = format!("status {} body {:?}", r.status, r.text()),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "kache registry did not answer 200 on {url} within {READY_TIMEOUT:?} \
             (last: {last}; log below)"
        );
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
