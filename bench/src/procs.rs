//! The servers under test as child processes, and what /proc says about them: CPU time
//! (utime + stime of the process and its descendants) and memory (VmRSS, VmHWM).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A port on 127.0.0.1 that was free a moment ago: for the peers, which cannot say where they
/// bound; kache's own processes start on `:0` and say it ([`Proc::spawn_kache`]).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A child process that is stopped (SIGTERM, then SIGKILL after 5 s) when dropped.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub pid: u32,
    child: Option<Child>,
    pub stderr: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr going to `<dir>/<name>.out` and `.err`, and notes
    /// its pid in `pids` (what `bench/run` stops if this process dies first).
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path, pids: &Path) -> Result<Proc> {
        let out = dir.join(format!("{name}.out"));
        let err = dir.join(format!("{name}.err"));
        cmd.stdin(Stdio::null())
            .stdout(File::create(&out)?)
            .stderr(File::create(&err)?);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let pid = child.id();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(pids)?
            .write_all(format!("{pid}\n").as_bytes())?;
        eprintln!("  started {name} (pid {pid})");
        Ok(Proc {
            name: name.to_owned(),
            pid,
            child: Some(child),
            stderr: err,
        })
    }

    /// [`Proc::spawn`] for a kache role whose listeners are all on `127.0.0.1:0`: waits for the
    /// `--ready-file` it writes once they are bound, and gives their addresses back.
    pub fn spawn_kache(
        name: &str,
        mut cmd: Command,
        dir: &Path,
        pids: &Path,
    ) -> Result<(Proc, Listeners)> {
        let ready = dir.join(format!("{name}.ready"));
        let _ = std::fs::remove_file(&ready);
        cmd.arg("--ready-file").arg(&ready);
        let mut proc = Proc::spawn(name, cmd, dir, pids)?;
        let child = proc.child.as_mut().expect("a child that was just started");
        match kache_testkit::process::wait_ready_file(child, &ready, Duration::from_secs(20)) {
            Ok(bound) => Ok((proc, Listeners(bound))),
            Err(e) => {
                proc.check_alive()?;
                bail!("{name} never said where it listens: {e:?}")
            }
        }
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            // Go panics print their reason first and a long stack after it.
            let lines: Vec<&str> = log.lines().collect();
            let cause = lines
                .iter()
                .find(|l| l.starts_with("panic:") || l.contains("level=fatal"));
            let tail = &lines[lines.len().saturating_sub(10)..];
            bail!(
                "{} exited ({status}): {}\n{}",
                self.name,
                cause.unwrap_or(&""),
                tail.join("\n")
            );
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            // SIGTERM first: nginx's master stops its workers, kache flushes its index.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.pid.to_string())
                .status();
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

/// The addresses a kache process bound, by listener name (`listen`, `internal`, `metrics`,
/// `proxy`), as its `--ready-file` says.
#[derive(Debug)]
pub struct Listeners(std::collections::BTreeMap<String, Vec<SocketAddr>>);

impl Listeners {
    /// `http://<addr>` of the first listener named `name`.
    pub fn url(&self, name: &str) -> Result<String> {
        Ok(format!("http://{}", self.addr(name)?))
    }

    /// The first listener named `name`.
    pub fn addr(&self, name: &str) -> Result<SocketAddr> {
        match self.0.get(name).and_then(|a| a.first()) {
            Some(addr) => Ok(*addr),
            None => bail!("no listener named {name} in {:?}", self.0),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// utime + stime of every process in /proc, and each one's parent.
fn all_stats() -> HashMap<u32, (u32, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(v) = stat(pid) {
            out.insert(pid, v);
        }
    }
    out
}

/// (ppid, utime + stime in ticks) from /proc/<pid>/stat.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// Clock ticks per second of /proc's CPU times.
pub fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// CPU ticks used so far by `pid` and all its descendants (nginx's workers).
pub fn tree_ticks(pid: u32) -> u64 {
    let all = all_stats();
    let mut total = 0;
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        if let Some((_, t)) = all.get(&p) {
            total += t;
        }
        stack.extend(
            all.iter()
                .filter(|(_, (ppid, _))| *ppid == p)
                .map(|(child, _)| *child),
        );
    }
    total
}

/// (VmRSS, VmHWM) in bytes.
pub fn memory(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = s.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets the peak RSS (VmHWM) of `pid` to its current RSS (`clear_refs` value 5).
pub fn reset_peak(pid: u32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting the peak RSS of {pid} (needs root or the owner)"))
}

/// Writes back and drops the kernel's page cache, as a node's reboot leaves it, so that a start
/// is measured reading the disk; whether it could (it needs root).
pub fn drop_page_cache() -> bool {
    Command::new("sync").status().is_ok_and(|s| s.success())
        && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}
