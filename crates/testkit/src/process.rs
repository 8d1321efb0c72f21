//! Child processes: commands run to completion within a deadline (their output kept in files),
//! and servers waited for, then stopped as Kubernetes stops them.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What a bounded command printed and how it ended.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// Runs `command` to completion within `timeout` (killing it after), its output collected in
/// files under `dir` so that a chatty child cannot block on a full pipe while it is polled.
pub fn run_bounded(mut command: Command, dir: &Path, timeout: Duration) -> Ran {
    let out_dir = tempfile::Builder::new()
        .prefix("run")
        .tempdir_in(dir)
        .expect("create output dir");
    let stdout_path = out_dir.path().join("stdout");
    let stderr_path = out_dir.path().join("stderr");
    let create =
        |p: &Path| File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    command
        .stdin(Stdio::null())
        .stdout(create(&stdout_path))
        .stderr(create(&stderr_path));
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll child") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let status = child.wait().expect("reap child");
            let mut f = OpenOptions::new()
                .append(true)
                .open(&stderr_path)
                .expect("open stderr file");
            let _ = writeln!(f, "(killed by the test harness after {timeout:?})");
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    Ran {
        status,
        stdout: read(&stdout_path),
        stderr: read(&stderr_path),
    }
}

/// How [`terminate`] ended a child.
#[derive(Debug)]
pub enum Stopped {
    /// It exited on SIGTERM, with this status.
    Exited(ExitStatus),
    /// It was still running past the bound, and was killed.
    Killed,
}

/// Stops `child` the way Kubernetes does: SIGTERM, so that it shuts down cleanly, then SIGKILL
/// if it has not exited `within`; reaps it either way.
pub fn terminate(child: &mut std::process::Child, within: Duration) -> Stopped {
    // std has no SIGTERM; the kill(1) utility sends it by pid.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Stopped::Exited(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    kill(child);
    Stopped::Killed
}

/// Kills `child` with SIGKILL (no chance to clean up) and reaps it.
pub fn kill(child: &mut std::process::Child) {
    // std's Child::kill is SIGKILL on Unix.
    let _ = child.kill();
    let _ = child.wait();
}

/// Why a child did not come to serve.
#[derive(Debug)]
pub enum NotServing {
    /// It exited first, with this status.
    Exited(ExitStatus),
    /// It ran, but `url` gave no ready answer in time; the last thing it said.
    Silent(String),
}

/// Polls `GET url` until its status is one `ready` takes, `child` exits, or `within` passes.
/// One poll waits at most a second, so a server that accepts but never answers cannot outlast
/// the bound.
pub fn wait_serving(
    child: &mut std::process::Child,
    url: &str,
    within: Duration,
    ready: impl Fn(u16) -> bool,
) -> Result<(), NotServing> {
    let deadline = Instant::now() + within;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("poll child") {
            return Err(NotServing::Exited(status));
        }
        match crate::http::try_request_within(Duration::from_secs(1), "GET", url, &[], &[]) {
            Ok(r) if ready(r.status) => return Ok(()),
            Ok(r) => last = format!("status {} body {:?}", r.status, r.text()),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(NotServing::Silent(last))
}

/// Where a kache child listens, from the `--ready-file` it writes once every listener is bound
/// (so it may be started on `:0`): `name -> addresses` (a name bound more than once has
/// several). Waits until the file is there, the child exits, or `within` passes.
pub fn wait_ready_file(
    child: &mut std::process::Child,
    path: &Path,
    within: Duration,
) -> Result<std::collections::BTreeMap<String, Vec<std::net::SocketAddr>>, NotServing> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            let json: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {text}", path.display()));
            let addr = |v: &serde_json::Value| -> std::net::SocketAddr {
                v.as_str()
                    .and_then(|a| a.parse().ok())
                    .unwrap_or_else(|| panic!("{} holds no address: {text}", path.display()))
            };
            let map = json
                .as_object()
                .unwrap_or_else(|| panic!("{} is not an object: {text}", path.display()))
                .iter()
                .map(|(k, v)| {
                    let addrs = match v.as_array() {
                        Some(list) => list.iter().map(addr).collect(),
                        None => vec![addr(v)],
                    };
                    (k.clone(), addrs)
                })
                .collect();
            return Ok(map);
        }
        if let Some(status) = child.try_wait().expect("poll child") {
            return Err(NotServing::Exited(status));
        }
        if Instant::now() >= deadline {
            return Err(NotServing::Silent(format!(
                "no {} within {within:?}",
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `kache <role>` as the tests run it: stdout and stderr appended to `log`, no colour (the log
/// is read as text), and no HTTP proxy of the environment (the tests' upstreams are local).
pub fn kache_logged(role: &str, log: &Path) -> Command {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
    let stdout = file.try_clone().expect("clone log handle");
    let mut command = Command::new(crate::kache_bin());
    command
        .arg(role)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(file)
        .env("NO_COLOR", "1");
    for var in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        command.env_remove(var);
    }
    command
}
