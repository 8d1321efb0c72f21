//! A `kache proxy` child process on 127.0.0.1: the node proxy in front of a kache registry, for
//! tests that pull the way a kubelet (or containerd in mirror mode) does.

use crate::process::{self, NotServing};
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use tempfile::TempDir;

/// How long a started proxy has to answer `GET /v2/`. It answers that itself, without the
/// registry, so this only covers process start.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `kache proxy --listen 127.0.0.1:P --registry URL --metrics-listen 127.0.0.1:Q`.
///
/// Killed when dropped; its log's tail is printed when that happens during a panic.
#[derive(Debug)]
pub struct KacheProxy {
    registry: String,
    extra_args: Vec<OsString>,
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    child: Option<Child>,
    log_path: PathBuf,
    /// Kept (not deleted) when dropped during a panic, for reading the whole log.
    log_dir: Option<TempDir>,
}

impl KacheProxy {
    /// Starts a proxy in front of `registry` (a base URL such as `http://127.0.0.1:5000`) with
    /// extra arguments after the standard ones, and waits until it serves `/v2/`.
    pub fn start<S: AsRef<std::ffi::OsStr>>(registry: &str, extra_args: &[S]) -> Self {
        let log_dir = tempfile::Builder::new()
            .prefix("kache-proxy-log")
            .tempdir()
            .expect("create log dir");
        // Both on :0: the proxy says where it put them (--ready-file).
        let any: SocketAddr = "127.0.0.1:0".parse().expect("an address");
        let mut proxy = KacheProxy {
            registry: registry.to_owned(),
            extra_args: extra_args.iter().map(|a| a.as_ref().to_owned()).collect(),
            addr: any,
            metrics_addr: any,
            child: None,
            log_path: log_dir.path().join("kache-proxy.log"),
            log_dir: Some(log_dir),
        };
        proxy.spawn();
        proxy
    }

    /// The listener, e.g. `127.0.0.1:40123`: the host part of image references.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/metrics` on the metrics listener.
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.metrics_addr)
    }

    /// Everything the proxy has written to stdout and stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Kills the child with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::kill(&mut child);
            self.note("killed with SIGKILL");
        }
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "proxy already running");
        let mut command = process::kache_logged("proxy", &self.log_path);
        command
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--registry")
            .arg(&self.registry)
            .arg("--metrics-listen")
            .arg(self.metrics_addr.to_string())
            .args(&self.extra_args);
        let ready_file = self.log_path.with_file_name("ready.json");
        let _ = std::fs::remove_file(&ready_file);
        command.arg("--ready-file").arg(&ready_file);
        self.note(&format!("starting {command:?}"));
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
        self.child = Some(child);
        let child = self.child.as_mut().expect("child is running");
        match process::wait_ready_file(child, &ready_file, READY_TIMEOUT) {
            Ok(bound) => {
                let first = |name: &str| bound.get(name).and_then(|a| a.first().copied());
                self.addr = first("proxy").expect("the proxy's listener");
                self.metrics_addr = first("metrics").expect("the metrics listener");
            }
            Err(NotServing::Exited(status)) => {
                self.child = None;
                panic!("kache proxy exited with {status} before it listened (log below)");
            }
            Err(NotServing::Silent(why)) => panic!("kache proxy never listened: {why}"),
        }
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let url = format!("{}/v2/", self.base_url());
        let child = self.child.as_mut().expect("child is running");
        // 401: the ping's challenge, with --private-images.
        match process::wait_serving(child, &url, READY_TIMEOUT, |s| s == 200 || s == 401) {
            Ok(()) => {}
            Err(NotServing::Exited(status)) => {
                self.child = None;
                panic!("kache proxy exited with {status} before serving {url} (log below)");
            }
            Err(NotServing::Silent(last)) => {
                panic!(
                    "kache proxy did not answer 200 on {url} within {READY_TIMEOUT:?} (last: {last})"
                )
            }
        }
    }

    fn note(&self, what: &str) {
        if let Ok(mut f) = OpenOptions::new().append(true).open(&self.log_path) {
            let _ = writeln!(f, "===== test harness: {what}");
        }
    }
}

impl Drop for KacheProxy {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let logs = self.logs();
            let mut start = logs.len().saturating_sub(64 * 1024);
            while !logs.is_char_boundary(start) {
                start += 1;
            }
            eprintln!(
                "----- kache proxy log ({}) -----\n{}\n----- end of log -----",
                self.log_path.display(),
                &logs[start..]
            );
            if let Some(dir) = self.log_dir.take() {
                eprintln!("(proxy log kept in {})", dir.keep().display());
            }
        }
    }
}
