//! Online garbage collection: mark from every root, evict whole images when the store is over
//! its limits, sweep what nothing marks.
//!
//! - **Roots**: every tag; every image the cluster keeps (the controller's list, see
//!   [`KeptImage`]: digest references have no tag); every other manifest used or written within
//!   the grace period (a push in progress, an image pulled by digest a moment ago).
//! - **Mark**: a manifest marks its blob, its config and layers and its child manifests (an
//!   index marks its children in the same repository), and the manifests whose subject it is
//!   (a referrer stays while its subject does).
//! - **Evict** (only when the store is over `--max-size` or the disk under `--min-free`): whole
//!   images, least recently pulled first, never a pinned one (a CachedImage that is retained or
//!   used by a live pod), until the garbage plus what they alone hold covers what must be freed.
//! - **Sweep**: blobs nothing marks that were neither written nor used within the grace period,
//!   and those only evicted images held, with their index records, in batches.
//!
//! Traffic goes on meanwhile; gate.rs says how the two never step on each other.
//!
//! plan.rs decides from a snapshot of the index, without I/O; this file carries a collection out
//! (its thread and pace, the evictions, the sweep) and holds the store's limits and kept images.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kache_oci::{Digest, RepoName};
pub use kache_wire::{GcReport, KeptImage, Pressure};

use crate::error::{Result, StoreError};
use crate::index::{Doomed, Index, now};
use crate::{Store, blocking};

mod plan;

use plan::Plan;

/// Blobs removed per index transaction: small enough that a write waiting on one of them (and
/// writers queued behind the transaction) waits milliseconds.
const SWEEP_BATCH: usize = 64;

/// The share of a core a collection takes by default. It is background work, and pulls during
/// it must keep their latency (DESIGN.md: p99 within 1.2x). Measured on a saturated 2-core
/// machine (BENCHMARKS.md), half a core already doubled the p99 of 1 KiB blob pulls (the
/// collection's walk through the index competes for memory and caches, not only for CPU time,
/// so a low priority alone does not help); a tenth left it unchanged.
pub const DEFAULT_DUTY: f64 = 0.1;

/// Work in slices of this long, then rest in proportion.
const SLICE: Duration = Duration::from_millis(5);

/// Paces a collection's work on its thread: after each [`SLICE`] of work, a rest that keeps it
/// to its duty cycle.
#[derive(Debug)]
pub(crate) struct Pace {
    rest_per_work: f64,
    since: Instant,
    /// Work done in the slices rested after.
    worked: Duration,
}

impl Pace {
    pub(crate) fn new(duty: f64) -> Self {
        let duty = duty.clamp(0.01, 1.0);
        Pace {
            rest_per_work: (1.0 - duty) / duty,
            since: Instant::now(),
            worked: Duration::ZERO,
        }
    }

    /// All the work done so far, without the rests.
    pub(crate) fn worked(&self) -> Duration {
        self.worked + self.since.elapsed()
    }

    /// Called often: rests when a slice of work is done.
    pub(crate) fn tick(&mut self) {
        let worked = self.since.elapsed();
        if worked >= SLICE {
            self.worked += worked;
            if self.rest_per_work > 0.0 {
                std::thread::sleep(worked.mul_f64(self.rest_per_work));
            }
            self.since = Instant::now();
        }
    }

    /// How long to rest after `worked` (for work done elsewhere, like a sweep's batch).
    pub(crate) fn rest_after(&self, worked: Duration) -> Duration {
        worked.mul_f64(self.rest_per_work)
    }
}

/// How one collection runs.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Nothing written or used more recently than this is swept.
    pub grace: Duration,
    /// Decide and report, change nothing.
    pub dry_run: bool,
    /// Upload sessions untouched for this long are removed too.
    pub upload_timeout: Option<Duration>,
    /// Blobs per sweep transaction (tests slow a sweep down with 1).
    pub batch: usize,
    /// The share of one core a collection may take while it runs, in (0, 1]: it works in
    /// slices of a few milliseconds and rests between them.
    pub duty: f64,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(3600),
            dry_run: false,
            upload_timeout: None,
            batch: SWEEP_BATCH,
            duty: DEFAULT_DUTY,
        }
    }
}

/// A job for the collection's thread.
type Job = Box<dyn FnOnce() + Send>;

/// The thread collections decide on, started with the first: one thread at the lowest CPU
/// priority, because marking a large store takes a core for a while and serving pulls comes
/// first (a thread's nice value is its own on Linux, and a pooled blocking thread would keep
/// it for whatever it runs next), and always the same one, so that the memory a collection
/// frees is reused by the next instead of spread over the allocator's per-thread arenas.
#[derive(Debug, Default)]
pub(crate) struct Worker(std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Job>>>);

impl Worker {
    fn sender(&self) -> Result<std::sync::mpsc::Sender<Job>> {
        if let Some(s) = self.0.get() {
            return Ok(s.lock().expect("gc worker poisoned").clone());
        }
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("kache-gc".into())
            .spawn(move || {
                if let Err(e) =
                    rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19)
                {
                    tracing::debug!(error = %e, "cannot lower the collection's priority");
                }
                // Ends when the store, and with it the sender, is dropped.
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        let _ = self.0.set(std::sync::Mutex::new(tx));
        Ok(self
            .0
            .get()
            .expect("just set")
            .lock()
            .expect("gc worker poisoned")
            .clone())
    }

    /// Runs `f` on the collection's thread.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.sender()?
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| StoreError::Index("the collection's thread is gone".into()))?;
        rx.await.map_err(|_| {
            StoreError::Index("the collection's thread ended without a result".into())
        })?
    }
}

/// Ends the collection on every path out of it.
struct Running<'a>(&'a Store);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.gate.end();
    }
}

impl Store {
    /// Sets the size cap and free-space floor that collections enforce.
    pub fn set_limits(&self, limits: crate::Limits) {
        self.space.set_limits(limits);
    }

    /// Refuses, before a byte is written, a write of `len` bytes that cannot fit on the disk
    /// (beside what fetches in progress have claimed); eviction is asked to make room.
    pub fn check_room(&self, len: u64) -> Result<()> {
        match self.space.claim(len) {
            Ok((_, low)) => {
                if low {
                    self.observer().pressure();
                }
                Ok(())
            }
            Err(why) => {
                self.observer().pressure();
                Err(StoreError::NoSpace(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    why,
                )))
            }
        }
    }

    /// Bytes free on the data directory's filesystem.
    pub fn free_bytes(&self) -> Result<u64> {
        Ok(self.space.disk()?.available)
    }

    /// What must be freed to be within the limits now (None when within them).
    pub fn pressure(&self) -> Result<Option<Pressure>> {
        let limits = self.space.limits();
        let total = self.total_bytes();
        let over_cap = limits.max_size.map_or(0, |m| total.saturating_sub(m));
        let disk = self.space.disk()?;
        let floor = self.space.min_free_bytes(disk.size);
        let under_floor = floor.saturating_sub(disk.available);
        let reason = match (over_cap > 0, under_floor > 0) {
            (false, false) => return Ok(None),
            (true, false) => "max-size",
            (false, true) => "min-free",
            (true, true) => "max-size and min-free",
        };
        Ok(Some(Pressure {
            reason: reason.into(),
            needed_bytes: over_cap.max(under_floor),
            unmet_bytes: 0,
        }))
    }

    /// Runs one collection now. Fails with [`StoreError::Busy`] if one is running.
    pub async fn collect(self: &Arc<Self>, opts: GcOptions) -> Result<GcReport> {
        let started = Instant::now();
        let mut report = GcReport {
            dry_run: opts.dry_run,
            started_at: now(),
            ..GcReport::default()
        };
        // Gate on, then access times into the index, then the snapshot (gate.rs, rule 2).
        let flushing = self.flush_lock.lock().await;
        self.gate.begin().map_err(|_| StoreError::Busy)?;
        let _running = Running(self);
        self.flush_access_locked().await?;
        drop(flushing);

        if let (Some(t), false) = (opts.upload_timeout, opts.dry_run) {
            report.expired_uploads = self.expire_uploads(t).await? as u64;
        }
        let mut pressure = self.pressure()?;
        let need = pressure.as_ref().map_or(0, |p| p.needed_bytes);

        let store = self.clone();
        let (grace, duty) = (opts.grace, opts.duty);
        let (plan, doomed, repos, marking) = self
            .gc_worker
            .run(move || {
                let mut pace = Pace::new(duty);
                let (view, tx) = store.index.gc_view(&mut pace)?;
                let held = |d: &Digest| store.gate.is_held(d);
                let plan = Plan::make(&view, now(), grace, need, &held, &mut pace);
                let doomed = Index::doomed(&tx, &view, &plan.candidates, &mut pace)?;
                Ok((plan, doomed, Arc::new(view.repos), pace.worked()))
            })
            .await?;
        report.worked_seconds = marking.as_secs_f64();
        report.marked_manifests = plan.marked_manifests;
        report.marked_blobs = plan.marked_blobs;
        report.evicted_images = plan.evictions.iter().map(|(_, l)| l.clone()).collect();
        if let Some(p) = pressure.as_mut() {
            p.unmet_bytes = plan.unmet;
        }
        report.pressure = pressure;

        if opts.dry_run {
            report.removed_blobs = doomed.len() as u64;
            report.removed_manifests = doomed.iter().map(|d| d.manifests.len() as u64).sum();
            report.removed_bytes = doomed.iter().map(|d| d.size).sum();
        } else {
            if !plan.evictions.is_empty() {
                let (index, evictions) = (
                    self.index.clone(),
                    plan.evictions
                        .iter()
                        .map(|(e, _)| e.clone())
                        .collect::<Vec<_>>(),
                );
                blocking(move || index.evict(&evictions)).await?;
            }
            self.sweep(doomed, repos, opts.batch.max(1), opts.duty, &mut report)
                .await?;
            // Who may read a repository that holds nothing is nothing to keep; an expired
            // grant is kept for the grace period, so a refusal still says "expired".
            let (index, cutoff) = (self.index.clone(), now().saturating_sub(grace.as_secs()));
            let (repos, grants) = blocking(move || index.forget_tenancy(cutoff)).await?;
            report.forgotten_repositories = repos;
            report.forgotten_grants = grants;
        }
        report.store_bytes = self.total_bytes();
        report.duration_seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Removes `doomed` in batches: claim, commit, unlink, release (gate.rs, rule 3).
    async fn sweep(
        self: &Arc<Self>,
        doomed: Vec<Doomed>,
        repos: Arc<Vec<RepoName>>,
        batch: usize,
        duty: f64,
        report: &mut GcReport,
    ) -> Result<()> {
        let pace = Pace::new(duty);
        let mut doomed = doomed.into_iter().peekable();
        while doomed.peek().is_some() {
            let started = Instant::now();
            let chunk: Vec<Doomed> = doomed.by_ref().take(batch).collect();
            let claimed: HashSet<Digest> = self
                .gate
                .claim(chunk.iter().map(|d| d.digest.clone()))
                .into_iter()
                .collect();
            let (mine, kept): (Vec<Doomed>, Vec<Doomed>) =
                chunk.into_iter().partition(|d| claimed.contains(&d.digest));
            report.kept_in_use += kept.len() as u64;
            if mine.is_empty() {
                continue;
            }
            let (store, repos, digests) = (
                self.clone(),
                repos.clone(),
                mine.iter().map(|d| d.digest.clone()).collect::<Vec<_>>(),
            );
            // On the blocking pool at normal priority, not the collection's thread: a batch
            // holds the index's write lock, which pushes and fills wait for.
            let removed = blocking(move || {
                let refs: Vec<&Doomed> = mine.iter().collect();
                store.index.sweep(&refs, &repos)?;
                // The index no longer names them: a crash from here on leaves orphan files,
                // which the next open adopts and the next collection removes.
                for d in &mine {
                    match std::fs::remove_file(store.layout.blob(&d.digest)) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(mine)
            })
            .await;
            self.gate.release(&digests);
            let removed = removed?;
            for d in &removed {
                self.removed(d.size);
                report.removed_bytes += d.size;
                report.removed_manifests += d.manifests.len() as u64;
            }
            report.removed_blobs += removed.len() as u64;
            let worked = started.elapsed();
            report.worked_seconds += worked.as_secs_f64();
            tokio::time::sleep(pace.rest_after(worked)).await;
        }
        Ok(())
    }

    /// Replaces the list of images the cluster keeps (roots of every collection; pinned ones
    /// are never evicted). References that do not parse are refused whole.
    pub async fn set_kept(&self, images: &[KeptImage]) -> Result<usize> {
        let mut entries = Vec::with_capacity(images.len());
        for k in images {
            let (repo, reference) = kept_key(&k.image).ok_or_else(|| {
                StoreError::Index(format!(
                    "{:?} is not a normalised image reference (like docker.io/library/nginx:1.27)",
                    k.image
                ))
            })?;
            entries.push((repo, reference, k.pinned));
        }
        let n = entries.len();
        let index = self.index.clone();
        blocking(move || index.set_kept(&entries)).await?;
        Ok(n)
    }

    /// The images the cluster keeps, as last set, named by their cache repository.
    pub fn kept(&self) -> Result<Vec<KeptImage>> {
        Ok(self
            .index
            .kept()?
            .into_iter()
            .map(|(repo, reference, pinned)| {
                let sep = if reference.contains(':') { '@' } else { ':' };
                KeptImage {
                    image: format!("{repo}{sep}{reference}"),
                    pinned,
                }
            })
            .collect())
    }
}

/// `docker.io/library/nginx:1.27` → (`docker.io/library/nginx`, `1.27`); `registry:5000/x@sha256:…`
/// → (`registry_5000/x`, the digest): the cache repository and what it pulls (a reference with
/// both a tag and a digest pulls the digest).
fn kept_key(image: &str) -> Option<(RepoName, String)> {
    let image: kache_oci::ImageReference = image.parse().ok()?;
    Some((image.cache_repository(), image.reference().to_string()))
}

#[cfg(test)]
#[path = "gc_tests.rs"]
mod tests;
