//! The Markdown report: its header (the machine and the servers' versions), the sections the
//! steps write, and at the end the budgets of DESIGN.md checked against this run and the
//! errors seen on the way.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::{MIB, Options};

/// The report being written.
#[derive(Debug)]
pub struct Report {
    /// The Markdown so far; each step appends its section.
    pub md: String,
    /// Errors to list at the end.
    notes: Vec<String>,
    budgets: Vec<Budget>,
}

/// One budget line: what DESIGN.md asks, what was measured, whether it holds.
#[derive(Debug)]
struct Budget {
    what: String,
    measured: String,
    met: bool,
}

impl Report {
    /// A report that starts with what the run was made on and with.
    pub fn new(o: &Options, kache: &Path) -> Self {
        let mut md = String::new();
        let _ = writeln!(md, "## Results\n");
        let _ = writeln!(md, "Machine: {}.  ", machine());
        let _ = writeln!(
            md,
            "Servers: kache {} ({}), {}, {}.  ",
            version(&kache.to_string_lossy(), &["--version"]).trim_start_matches("kache "),
            git_rev(),
            version("docker-registry", &["--version"]),
            version("nginx", &["-v"]),
        );
        let _ = writeln!(
            md,
            "Client: kache-bench on the same cores; {} connections; load steps {:?}, stream steps {:?}, {} round(s), median reported.\n",
            o.connections, o.duration, o.stream_duration, o.rounds
        );
        Report {
            md,
            notes: Vec::new(),
            budgets: Vec::new(),
        }
    }

    /// An error to list at the end.
    pub fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// Notes a measurement's failed requests, if it had any.
    pub fn note_errors(&mut self, what: &str, errors: u64, first: &Option<String>) {
        if errors > 0 {
            self.notes.push(format!(
                "{what}: {errors} errors, the first: {}",
                first.as_deref().unwrap_or("?")
            ));
        }
    }

    /// A row of the budget table.
    pub fn budget(&mut self, what: impl Into<String>, measured: impl Into<String>, met: bool) {
        self.budgets.push(Budget {
            what: what.into(),
            measured: measured.into(),
            met,
        });
    }

    /// The whole report: the steps' sections, the budget table, the errors, and the servers
    /// that did not live to the end.
    pub fn finish(self, deaths: &[anyhow::Error]) -> String {
        let Report {
            mut md,
            notes,
            budgets,
        } = self;
        let _ = writeln!(md, "### Budgets (DESIGN.md) in this run\n");
        let _ = writeln!(md, "| budget | measured | met |");
        let _ = writeln!(md, "| --- | --- | --- |");
        for b in &budgets {
            let met = if b.met { "yes" } else { "**no**" };
            let _ = writeln!(md, "| {} | {} | {met} |", b.what, b.measured);
        }
        let _ = writeln!(md);
        if !notes.is_empty() {
            let _ = writeln!(md, "Errors:\n");
            for n in &notes {
                let _ = writeln!(md, "- {n}");
            }
            let _ = writeln!(md);
        }
        for e in deaths {
            let _ = writeln!(md, "- a server died during the run: {e:#}");
        }
        md
    }
}

fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let mem = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or("unknown".into(), |kb| {
            format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0)
        });
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    format!("{cores} cores ({model}), {mem} memory, Linux {kernel}")
}

fn version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let s = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&s)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|| "unknown".into())
}

fn git_rev() -> String {
    let rev = version("git", &["rev-parse", "--short", "HEAD"]);
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    if dirty {
        format!("{rev} with uncommitted changes")
    } else {
        rev
    }
}

/// Bytes per second as MB/s, no decimals.
pub fn mb(bps: f64) -> String {
    format!("{:.0}", bps / 1e6)
}

/// Bytes as `12.3 MiB`.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// A whole number with thousands separated by commas: `12,345`.
pub fn thousands(n: f64) -> String {
    let s = format!("{:.0}", n);
    let neg = s.starts_with('-');
    let digits: Vec<char> = s.trim_start_matches('-').chars().collect();
    let mut out = String::new();
    for (i, c) in digits.iter().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(*c);
    }
    if neg { format!("-{out}") } else { out }
}

/// A duration in ms under a second, in seconds above.
pub fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}

/// `a / b` as `1.23x`, or `n/a` when `b` is nothing.
pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "n/a".into()
    }
}
