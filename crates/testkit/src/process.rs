//! Child commands run to completion within a deadline, their output kept in files.

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
