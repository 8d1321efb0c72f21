//! What the garbage-collection and scale steps share: a synthetic store made by
//! `kache_store::fixtures`, and a `kache registry` of their own started on it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use kache_store::fixtures::{self, Made, Spec};

use super::servers::{ANY, kache_command, wait_ready};
use crate::procs::Proc;

/// Makes the store of `spec` in `<dir>/data`, then runs `after` on that directory (both off the
/// runtime); the directory and what was made.
pub async fn make_store(
    step: &str,
    dir: &Path,
    spec: &Spec,
    after: impl FnOnce(&Path) -> Result<()> + Send + 'static,
) -> Result<(PathBuf, Made)> {
    eprintln!("{step}: making a store of {} manifests", spec.manifests);
    let t = Instant::now();
    let data = dir.join("data");
    let made = {
        let (data, spec) = (data.clone(), spec.clone());
        tokio::task::spawn_blocking(move || {
            let made = fixtures::make(&data, &spec)?;
            after(&data)?;
            anyhow::Ok(made)
        })
        .await
        .map_err(|e| anyhow!("{e}"))??
    };
    eprintln!(
        "  {} blobs, {} manifests in {} repositories, made in {:.1} s",
        made.blobs,
        made.manifests,
        made.repositories,
        t.elapsed().as_secs_f64()
    );
    Ok((data, made))
}

/// A `kache registry` serving a synthetic store, garbage collection off.
pub struct StoreRegistry {
    pub proc: Proc,
    /// `http://127.0.0.1:<port>` of the read listener.
    pub base: String,
    /// The same of the internal (write) listener.
    pub internal: String,
    /// From the process's start until `/v2/` answered.
    pub ready: Duration,
}

/// Starts `kache registry` on `data` (logs in `dir`, named `name`), with `extra` flags, and
/// waits until it answers.
pub async fn start_registry(
    kache: &Path,
    data: &Path,
    dir: &Path,
    pids: &Path,
    name: &str,
    extra: &[&std::ffi::OsStr],
) -> Result<StoreRegistry> {
    let mut cmd = kache_command(kache);
    cmd.arg("registry")
        .args(["--listen", ANY])
        .args(["--internal-listen", ANY])
        .args(["--metrics-listen", ANY])
        .arg("--data-dir")
        .arg(data)
        .arg("--gc-schedule")
        .arg("off")
        .args(extra);
    let started = Instant::now();
    let (mut proc, bound) = Proc::spawn_kache(name, cmd, dir, pids)?;
    let base = bound.url("listen")?;
    wait_ready(&mut proc, &format!("{base}/v2/")).await?;
    Ok(StoreRegistry {
        ready: started.elapsed(),
        proc,
        base,
        internal: bound.url("internal")?,
    })
}
