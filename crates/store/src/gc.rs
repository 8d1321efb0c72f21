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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kache_oci::{Digest, RepoName};
pub use kache_wire::{GcReport, KeptImage, Pressure};

use crate::error::{Result, StoreError};
use crate::index::{BlobId, Doomed, Eviction, Index, KeptRef, View, now};
use crate::{Store, blocking};

/// Blobs removed per index transaction: small enough that a write waiting on one of them (and
/// writers queued behind the transaction) waits milliseconds.
const SWEEP_BATCH: usize = 64;

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
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(3600),
            dry_run: false,
            upload_timeout: None,
            batch: SWEEP_BATCH,
        }
    }
}

/// A root of the mark.
#[derive(Debug)]
struct Root {
    repo: u32,
    manifest: BlobId,
    /// How to evict it, if it may be.
    evict: Option<Eviction>,
    label: String,
    last_pulled: u64,
}

/// What a collection decided from its snapshot.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub marked_manifests: u64,
    pub marked_blobs: u64,
    /// Blobs to sweep, garbage first.
    pub candidates: Vec<BlobId>,
    pub evictions: Vec<(Eviction, String)>,
    pub unmet: u64,
}

impl Plan {
    /// Decides, from `view` at time `now`: `need` bytes must be freed (0 when within limits);
    /// `held` says whether a digest was used since the collection began.
    pub(crate) fn make(
        view: &View,
        now: u64,
        grace: Duration,
        need: u64,
        held: &dyn Fn(&Digest) -> bool,
    ) -> Plan {
        let grace = grace.as_secs();
        // Whole seconds: with a grace of 0 nothing is recent.
        let recent = |t: u64| t.saturating_add(grace) > now;
        let roots = roots(view, &recent);

        // Each root's reach counted once per blob: a blob nothing counts is garbage, and evicting
        // an image frees the blobs whose count it brings to zero.
        let mut count = vec![0u32; view.blobs.len()];
        let mut manifests = HashSet::new();
        let mut scratch = Reach::default();
        for r in &roots {
            for &b in scratch.of(view, r, &mut manifests) {
                count[b as usize] += 1;
            }
        }
        let mut plan = Plan {
            marked_manifests: manifests.len() as u64,
            marked_blobs: count.iter().filter(|&&c| c > 0).count() as u64,
            ..Plan::default()
        };
        let mut garbage_bytes = 0;
        for (id, b) in view.blobs.iter().enumerate() {
            if count[id] == 0 && !recent(b.created.max(b.access)) {
                plan.candidates.push(id as BlobId);
                garbage_bytes += b.size;
            }
        }
        if need <= garbage_bytes {
            return plan;
        }

        let mut freed = 0u64;
        let mut evictable: Vec<&Root> = roots.iter().filter(|r| r.evict.is_some()).collect();
        evictable.sort_by(|a, b| (a.last_pulled, &a.label).cmp(&(b.last_pulled, &b.label)));
        let mut ignore = HashSet::new();
        for r in evictable {
            if garbage_bytes + freed >= need {
                break;
            }
            if held(&view.blobs[r.manifest as usize].digest) {
                continue;
            }
            for &b in scratch.of(view, r, &mut ignore) {
                let c = &mut count[b as usize];
                *c -= 1;
                if *c == 0 {
                    freed += view.blobs[b as usize].size;
                    plan.candidates.push(b);
                }
            }
            let e = r.evict.clone().expect("filtered on evict");
            plan.evictions.push((e, r.label.clone()));
        }
        plan.unmet = need.saturating_sub(garbage_bytes + freed);
        plan
    }
}

/// Every root of `view`: tags, kept images, recent manifests.
fn roots(view: &View, recent: &dyn Fn(u64) -> bool) -> Vec<Root> {
    let pinned_tags: HashSet<(u32, &str)> = view
        .kept
        .iter()
        .filter(|k| k.pinned)
        .filter_map(|k| match &k.reference {
            KeptRef::Tag(t) => Some((k.repo, t.as_str())),
            _ => None,
        })
        .collect();
    let last_pulled = |m: BlobId, fallback: u64| {
        let b = &view.blobs[m as usize];
        if b.access > 0 { b.access } else { fallback }
    };
    let mut roots = Vec::new();
    for t in &view.tags {
        let repo = &view.repos[t.repo as usize];
        let pinned = pinned_tags.contains(&(t.repo, t.tag.as_str()));
        roots.push(Root {
            repo: t.repo,
            manifest: t.manifest,
            evict: (!pinned).then(|| Eviction::Tag {
                repo: repo.clone(),
                tag: t.tag.clone(),
                digest: view.blobs[t.manifest as usize].digest.clone(),
            }),
            label: format!("{repo}:{}", t.tag),
            last_pulled: last_pulled(t.manifest, t.updated),
        });
    }
    for k in &view.kept {
        let KeptRef::Digest(m) = k.reference else {
            continue;
        };
        let Some(info) = view.manifests.get(&(k.repo, m)) else {
            continue;
        };
        let repo = &view.repos[k.repo as usize];
        let digest = &view.blobs[m as usize].digest;
        roots.push(Root {
            repo: k.repo,
            manifest: m,
            evict: (!k.pinned).then(|| Eviction::Kept {
                repo: repo.clone(),
                reference: digest.to_string(),
            }),
            label: format!("{repo}@{digest}"),
            last_pulled: last_pulled(m, info.created),
        });
    }
    // Manifests no tag or kept image names yet, used or written within the grace period: a push
    // in progress (children before their index), an image pulled by digest a moment ago.
    let named: HashSet<(u32, BlobId)> = roots.iter().map(|r| (r.repo, r.manifest)).collect();
    for (&(repo, m), info) in &view.manifests {
        if !named.contains(&(repo, m)) && recent(info.created.max(view.blobs[m as usize].access)) {
            roots.push(Root {
                repo,
                manifest: m,
                evict: None,
                label: String::new(),
                last_pulled: 0,
            });
        }
    }
    roots
}

/// A walk from one root, reusing its buffers.
#[derive(Debug, Default)]
struct Reach {
    seen: HashSet<(u32, BlobId)>,
    blobs: Vec<BlobId>,
    blob_seen: HashSet<BlobId>,
    stack: Vec<(u32, BlobId)>,
}

impl Reach {
    /// The blobs `root` reaches, each once; every manifest reached is added to `manifests`.
    fn of(
        &mut self,
        view: &View,
        root: &Root,
        manifests: &mut HashSet<(u32, BlobId)>,
    ) -> &[BlobId] {
        self.seen.clear();
        self.blobs.clear();
        self.blob_seen.clear();
        self.stack.clear();
        self.stack.push((root.repo, root.manifest));
        while let Some((repo, m)) = self.stack.pop() {
            if !self.seen.insert((repo, m)) {
                continue;
            }
            if view.manifests.contains_key(&(repo, m)) {
                manifests.insert((repo, m));
            }
            if self.blob_seen.insert(m) {
                self.blobs.push(m);
            }
            for &r in view.refs.get(&m).into_iter().flatten() {
                if view.manifests.contains_key(&(repo, r)) {
                    self.stack.push((repo, r));
                } else if self.blob_seen.insert(r) {
                    self.blobs.push(r);
                }
            }
            for &r in view.referrers.get(&(repo, m)).into_iter().flatten() {
                self.stack.push((repo, r));
            }
        }
        &self.blobs
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
        let grace = opts.grace;
        let (plan, doomed, sizes) = blocking(move || {
            let (view, tx) = store.index.gc_view()?;
            let held = |d: &Digest| store.gate.is_held(d);
            let plan = Plan::make(&view, now(), grace, need, &held);
            let doomed = Index::doomed(&tx, &view, &plan.candidates)?;
            let sizes: HashMap<Digest, u64> = plan
                .candidates
                .iter()
                .map(|&b| {
                    let b = &view.blobs[b as usize];
                    (b.digest.clone(), b.size)
                })
                .collect();
            Ok((plan, doomed, sizes))
        })
        .await?;
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
            report.removed_bytes = doomed.iter().map(|d| sizes[&d.digest]).sum();
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
            self.sweep(doomed, &sizes, opts.batch.max(1), &mut report)
                .await?;
        }
        report.store_bytes = self.total_bytes();
        report.duration_seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Removes `doomed` in batches: claim, commit, unlink, release (gate.rs, rule 3).
    async fn sweep(
        self: &Arc<Self>,
        doomed: Vec<Doomed>,
        sizes: &HashMap<Digest, u64>,
        batch: usize,
        report: &mut GcReport,
    ) -> Result<()> {
        let mut doomed = doomed.into_iter().peekable();
        while doomed.peek().is_some() {
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
            let (store, digests) = (
                self.clone(),
                mine.iter().map(|d| d.digest.clone()).collect::<Vec<_>>(),
            );
            let removed = blocking(move || {
                let refs: Vec<&Doomed> = mine.iter().collect();
                store.index.sweep(&refs)?;
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
                let size = sizes.get(&d.digest).copied().unwrap_or(0);
                self.removed(size);
                report.removed_bytes += size;
                report.removed_manifests += d.manifests.len() as u64;
            }
            report.removed_blobs += removed.len() as u64;
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
