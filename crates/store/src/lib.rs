//! kache's content store: blobs as plain files addressed by digest, metadata in a redb index.
//!
//! Invariants, which every public method keeps:
//! - a blob file at its final path always hashes to its name: bytes are hashed while they are
//!   written to `tmp/`, verified, fsynced and only then renamed into `blobs/`;
//! - the index only names blobs whose file is in place (the file is installed first, the
//!   index transaction commits second; [`Store::open`] repairs what a crash left in between);
//! - nothing here knows HTTP, so the registry, the pull-through path and GC share it;
//! - garbage collection runs while everything else goes on: gate.rs says how.
//!
//! On disk, under the data directory:
//!
//! ```text
//! blobs/<alg>/<first two hex>/<hex>   every blob and manifest, named by its digest
//! tmp/<uuid>                          writes in progress (removed at open: they never finished)
//! uploads/<uuid>                      upload sessions; the file's length is the offset
//! index.redb                          the index (index.rs lists its tables)
//! ```

mod error;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
mod flight;
mod fs;
mod gate;
mod gc;
mod index;
mod read;
mod space;
mod upload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use kache_oci::{Algorithm, Digest, ParsedManifest, Reference, RepoName};

pub use error::{Result, StoreError};
pub use flight::{ByteStream, FetchError, FetchFailure, FlightStream, Source, SourceFn};
pub use fs::BlobWriter;
pub use gc::{DEFAULT_DUTY, GcOptions, GcReport, KeptImage, Pressure};
pub use index::{BlobRecord, ManifestRecord, TagRecord};
pub use read::read_range;
pub use space::{Limits, MinFree, SpaceError, parse_size};
pub use upload::UploadStatus;

use fs::Layout;
use gate::Gate;
use index::{Index, NewManifest};

/// Largest manifest accepted: the limit distribution and most clients use.
pub const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

/// A blob ready to be streamed: an open file and its length.
#[derive(Debug)]
pub struct BlobFile {
    pub file: tokio::fs::File,
    pub size: u64,
}

/// A manifest as served: its bytes, digest and media type.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// An entry of a referrers listing.
#[derive(Debug, Clone)]
pub struct Referrer {
    pub digest: Digest,
    pub record: ManifestRecord,
}

/// What [`Store::open`] found and repaired.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub temp_files_removed: usize,
    pub missing_blobs_forgotten: usize,
    pub orphan_blobs_adopted: usize,
    pub stale_uploads_removed: usize,
}

/// The result of [`Store::verify`]: every blob re-hashed against its name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub blobs: usize,
    pub bytes: u64,
    /// Index entries whose file is missing or whose bytes do not hash to the digest.
    pub bad: Vec<String>,
}

/// Told what the store does on its own that an operator should see.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// A fetched blob was served to its clients but could not be kept (disk full, I/O error).
    fn blob_not_stored(&self, _digest: &Digest, _reason: &str) {}
    /// A write found the disk full, or nearly: eviction should run now.
    fn pressure(&self) {}
}

#[derive(Debug)]
struct NoObserver;
impl Observer for NoObserver {}

/// The content store. Cheap to share: wrap it in an `Arc`.
#[derive(Debug)]
pub struct Store {
    layout: Layout,
    index: Arc<Index>,
    total_bytes: AtomicU64,
    uploads: upload::Uploads,
    gate: Gate,
    /// Held while access times are moved from the gate into the index, so a collection never
    /// looks at the index while some of them are in neither place.
    flush_lock: tokio::sync::Mutex<()>,
    flights: flight::Flights,
    space: space::Space,
    observer: std::sync::OnceLock<Arc<dyn Observer>>,
    gc_worker: gc::Worker,
}

/// Runs blocking index work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Index(format!("index task failed: {e}")))?
}

impl Store {
    /// Opens (or creates) the store under `root`, repairing whatever a crash left behind.
    pub fn open(root: &Path) -> Result<(Store, Recovery)> {
        let layout = Layout::new(root);
        for d in [layout.blobs(), layout.tmp(), layout.uploads()] {
            std::fs::create_dir_all(&d)?;
        }
        let index = Index::open(&layout.index())?;
        let mut rec = Recovery::default();

        // Temporary files are writes that never completed.
        for e in std::fs::read_dir(layout.tmp())? {
            std::fs::remove_file(e?.path())?;
            rec.temp_files_removed += 1;
        }

        // Index entries whose file is gone are forgotten; a file at a final path that the
        // index does not know was verified before its rename, so it is adopted (unlinked:
        // GC decides its fate).
        let mut missing = Vec::new();
        let mut total = 0u64;
        index.for_each_blob(|d, r| match std::fs::metadata(layout.blob(&d)) {
            Ok(m) if m.len() == r.size => total += r.size,
            _ => missing.push(d),
        })?;
        rec.missing_blobs_forgotten = missing.len();
        index.forget_blobs(&missing)?;
        for_each_blob_file(&layout, |d, size| {
            if index.blob(&d)?.is_none() {
                index.add_blob(None, &d, size)?;
                total += size;
                rec.orphan_blobs_adopted += 1;
            }
            Ok(())
        })?;

        rec.stale_uploads_removed = upload::recover(&layout, &index)?;
        if rec != Recovery::default() {
            tracing::warn!(?rec, "store repaired after an unclean stop");
        }
        Ok((
            Store {
                layout,
                index: Arc::new(index),
                total_bytes: AtomicU64::new(total),
                uploads: upload::Uploads::default(),
                gate: Gate::default(),
                flush_lock: tokio::sync::Mutex::new(()),
                flights: Default::default(),
                space: space::Space::new(root),
                observer: std::sync::OnceLock::new(),
                gc_worker: gc::Worker::default(),
            },
            rec,
        ))
    }

    /// Bytes held in blob files (manifests included).
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes.load(Ordering::Relaxed)
    }

    fn added(&self, new: bool, size: u64) {
        if new {
            let total = self.total_bytes.fetch_add(size, Ordering::Relaxed) + size;
            if self.space.limits().max_size.is_some_and(|max| total > max) {
                self.observer().pressure();
            }
        }
    }

    fn removed(&self, size: u64) {
        let _ = self
            .total_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(size))
            });
    }

    /// Sets who hears about blobs served but not kept and about disk pressure (once).
    pub fn set_observer(&self, observer: Arc<dyn Observer>) {
        let _ = self.observer.set(observer);
    }

    fn observer(&self) -> &dyn Observer {
        match self.observer.get() {
            Some(o) => o.as_ref(),
            None => &NoObserver,
        }
    }

    // ---- blobs ----

    /// The size of `digest` if `repo` may serve it.
    pub fn stat_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>> {
        Ok(self.find_blob(repo, digest)?.map(|(size, _)| size))
    }

    /// The size of `digest` for `repo` and, for a fetched blob still being committed, the
    /// temporary file that holds it. Such a blob is verified already and its requester has had
    /// every byte: the next request is answered as a hit, not a miss (nor a HEAD's 404).
    fn find_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<(u64, Option<PathBuf>)>> {
        let found = self.find_blob_unheld(repo, digest)?;
        if found.is_some() {
            self.gate.touch(digest);
        }
        Ok(found)
    }

    fn find_blob_unheld(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<(u64, Option<PathBuf>)>> {
        if !self.gate.read(digest) {
            return Ok(None);
        }
        if let Some(size) = self.index.linked_blob(repo, digest)? {
            return Ok(Some((size, None)));
        }
        if let Some((size, tmp)) = self.flights.verified(repo, digest) {
            return Ok(Some((size, Some(tmp))));
        }
        // Committed between the two lookups (the flight leaves the map after the index commit).
        Ok(self
            .index
            .linked_blob(repo, digest)?
            .map(|size| (size, None)))
    }

    /// Opens `digest` for reading if `repo` may serve it.
    pub async fn open_blob(&self, repo: &RepoName, digest: &Digest) -> Result<BlobFile> {
        let (size, tmp) = self
            .find_blob(repo, digest)?
            .ok_or(StoreError::BlobUnknown)?;
        let path = self.layout.blob(digest);
        let opened = match tmp {
            // Renamed into place in the meantime: the final path has the same bytes.
            Some(tmp) => match tokio::fs::File::open(tmp).await {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tokio::fs::File::open(&path).await
                }
                r => r,
            },
            None => tokio::fs::File::open(&path).await,
        };
        let file = match opened {
            Ok(f) => f,
            // Deleted between the lookup and the open (GC): the blob is simply unknown now.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::BlobUnknown);
            }
            Err(e) => return Err(e.into()),
        };
        Ok(BlobFile { file, size })
    }

    /// The path of a blob's file, for readers that stream it themselves.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.layout.blob(digest)
    }

    /// A writer for a new blob that must hash to a digest of `algorithm`.
    pub async fn blob_writer(
        &self,
        algorithm: Algorithm,
        limit: Option<u64>,
    ) -> Result<BlobWriter> {
        let path = self.layout.tmp().join(uuid::Uuid::new_v4().to_string());
        BlobWriter::create(path, algorithm, limit).await
    }

    /// Verifies what `writer` holds against `expected`, installs it and links it into `repo`.
    /// On a mismatch nothing is kept.
    pub async fn commit_blob(
        &self,
        writer: BlobWriter,
        repo: &RepoName,
        expected: &Digest,
    ) -> Result<u64> {
        let (tmp, actual, size) = writer.finish().await?;
        if actual != *expected {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(StoreError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        let _hold = self.gate.write(&actual).await;
        let (layout, index, repo, d) = (
            self.layout.clone(),
            self.index.clone(),
            repo.clone(),
            actual,
        );
        let new = blocking(move || {
            fs::install(&layout, &tmp, &d)?;
            index.add_blob(Some(&repo), &d, size)
        })
        .await?;
        self.added(new, size);
        Ok(size)
    }

    /// Stores a whole blob from a stream (monolithic push, pull-through).
    pub async fn put_blob<S, E>(&self, repo: &RepoName, expected: &Digest, body: S) -> Result<u64>
    where
        S: Stream<Item = std::result::Result<Bytes, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut w = self.blob_writer(expected.algorithm(), None).await?;
        let mut body = std::pin::pin!(body);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| StoreError::Body(std::io::Error::other(e)))?;
            w.write(&chunk).await?;
        }
        self.commit_blob(w, repo, expected).await
    }

    /// Cross-repository mount: links a blob of `from` (or of any repository, without `from`)
    /// into `repo`. None if there is nothing to mount.
    pub async fn mount_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: Option<&RepoName>,
    ) -> Result<Option<u64>> {
        // A blob being swept has nothing to mount: the client uploads it instead.
        let Some(_hold) = self.gate.try_write(digest) else {
            return Ok(None);
        };
        let (index, repo, digest, from) = (
            self.index.clone(),
            repo.clone(),
            digest.clone(),
            from.cloned(),
        );
        blocking(move || index.mount(&repo, &digest, from.as_ref())).await
    }

    /// Removes `digest` from `repo`. The file stays until GC finds nothing referencing it.
    pub async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        let (index, repo, digest) = (self.index.clone(), repo.clone(), digest.clone());
        if blocking(move || index.unlink_blob(&repo, &digest)).await? {
            Ok(())
        } else {
            Err(StoreError::BlobUnknown)
        }
    }

    /// Writes the access times gathered since the last flush. Called periodically.
    pub async fn flush_access(&self) -> Result<usize> {
        let _flushing = self.flush_lock.lock().await;
        self.flush_access_locked().await
    }

    async fn flush_access_locked(&self) -> Result<usize> {
        let batch = self.gate.take_access();
        let n = batch.len();
        if n > 0 {
            let index = self.index.clone();
            let written = blocking({
                let batch = batch.clone();
                move || index.record_access(&batch)
            })
            .await;
            if let Err(e) = written {
                self.gate.restore_access(batch);
                return Err(e);
            }
        }
        Ok(n)
    }

    /// When a blob or manifest was last served, as far as flushed.
    pub fn last_access(&self, digest: &Digest) -> Result<Option<u64>> {
        self.index.last_access(digest)
    }

    /// The index record of a blob, whatever repository holds it.
    pub fn blob_record(&self, digest: &Digest) -> Result<Option<BlobRecord>> {
        self.index.blob(digest)
    }

    // ---- manifests ----

    /// Stores manifest `bytes` (already parsed) in `repo`, tagged when `reference` is a tag.
    /// Rejected with [`StoreError::ManifestBlobUnknown`] unless every config and layer blob is
    /// linked in `repo`; child manifests of an index may be absent (a cache fills them lazily).
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        bytes: Bytes,
        parsed: &ParsedManifest,
    ) -> Result<Digest> {
        self.store_manifest(repo, reference, bytes, parsed, true)
            .await
    }

    /// Stores a manifest fetched from upstream: its blobs are fetched on demand later, so
    /// none needs to be present now.
    pub async fn put_pulled_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        bytes: Bytes,
        parsed: &ParsedManifest,
    ) -> Result<Digest> {
        self.store_manifest(repo, reference, bytes, parsed, false)
            .await
    }

    async fn store_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        bytes: Bytes,
        parsed: &ParsedManifest,
        require_blobs: bool,
    ) -> Result<Digest> {
        let digest = match reference {
            Reference::Digest(d) => {
                let actual = Digest::compute(d.algorithm(), &bytes);
                if actual != *d {
                    return Err(StoreError::DigestMismatch {
                        expected: d.clone(),
                        actual,
                    });
                }
                actual
            }
            Reference::Tag(_) => Digest::sha256(&bytes),
        };
        let size = bytes.len() as u64;
        let record = ManifestRecord {
            media_type: parsed.media_type.clone(),
            size,
            artifact_type: parsed.effective_artifact_type().map(str::to_owned),
            subject: parsed.subject.as_ref().map(|s| s.digest.clone()),
            annotations: parsed.annotations.clone(),
            created: index::now(),
        };
        let required: Vec<Digest> = if require_blobs {
            parsed.required_blobs().map(|d| d.digest.clone()).collect()
        } else {
            Vec::new()
        };
        let references: Vec<Digest> = parsed.references().cloned().collect();
        let tag = match reference {
            Reference::Tag(t) => Some(t.as_str().to_owned()),
            Reference::Digest(_) => None,
        };

        // Everything it references is held until the index commits (gate.rs): a pushed manifest
        // is refused if the sweep is removing one of its blobs, a pulled one only refers to
        // blobs fetched on demand (again, if swept).
        let mut holds = Vec::with_capacity(references.len() + 1);
        for d in references.iter().chain(&required) {
            match self.gate.try_write(d) {
                Some(h) => holds.push(h),
                None if require_blobs => return Err(StoreError::ManifestBlobUnknown(d.clone())),
                None => {}
            }
        }
        // Refuse early, before any byte is written, so a rejected manifest leaves nothing. The
        // check inside the index transaction below stays the authoritative one (a concurrent
        // delete may land in between; its file is then an orphan for GC).
        for d in &required {
            if self.index.linked_blob(repo, d)?.is_none() {
                return Err(StoreError::ManifestBlobUnknown(d.clone()));
            }
        }
        holds.push(self.gate.write(&digest).await);
        let mut w = self.blob_writer(digest.algorithm(), None).await?;
        w.write(&bytes).await?;
        let (tmp, _, _) = w.finish().await?;
        let (layout, index, repo, d) = (
            self.layout.clone(),
            self.index.clone(),
            repo.clone(),
            digest.clone(),
        );
        let new = blocking(move || {
            let had_file = !fs::install(&layout, &tmp, &d)?;
            index.put_manifest(NewManifest {
                repo: &repo,
                digest: &d,
                record,
                tag: tag.as_deref(),
                required,
                references,
            })?;
            Ok(!had_file)
        })
        .await?;
        drop(holds);
        self.added(new, size);
        Ok(digest)
    }

    /// Resolves a tag or digest of `repo` to its manifest.
    pub async fn get_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<Manifest> {
        let manifest = self.find_manifest(repo, reference).await?;
        self.gate.touch(&manifest.digest);
        Ok(manifest)
    }

    async fn find_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<Manifest> {
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => {
                self.index
                    .tag(repo, t.as_str())?
                    .ok_or(StoreError::ManifestUnknown)?
                    .digest
            }
        };
        if !self.gate.read(&digest) {
            return Err(StoreError::ManifestUnknown);
        }
        let record = self
            .index
            .manifest(repo, &digest)?
            .ok_or(StoreError::ManifestUnknown)?;
        let bytes = match tokio::fs::read(self.layout.blob(&digest)).await {
            Ok(b) => Bytes::from(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::ManifestUnknown);
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Manifest {
            digest,
            media_type: record.media_type,
            bytes,
        })
    }

    /// The tag record of `repo:tag`, if any.
    pub fn tag(&self, repo: &RepoName, tag: &str) -> Result<Option<TagRecord>> {
        self.index.tag(repo, tag)
    }

    /// Marks `repo:tag` as confirmed by its upstream now (the tag TTL starts again).
    pub async fn touch_tag(&self, repo: &RepoName, tag: &str) -> Result<()> {
        let (index, repo, tag) = (self.index.clone(), repo.clone(), tag.to_owned());
        blocking(move || index.touch_tag(&repo, &tag)).await
    }

    /// Deletes a manifest by digest (with its tags), or just a tag.
    pub async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        let (index, repo, reference) = (self.index.clone(), repo.clone(), reference.clone());
        let found = blocking(move || match &reference {
            Reference::Digest(d) => index.delete_manifest(&repo, d),
            Reference::Tag(t) => index.delete_tag(&repo, t.as_str()),
        })
        .await?;
        if found {
            Ok(())
        } else {
            Err(StoreError::ManifestUnknown)
        }
    }

    /// Up to `n` tags of `repo` after `last`, in lexical order.
    pub fn list_tags(&self, repo: &RepoName, last: Option<&str>, n: usize) -> Result<Vec<String>> {
        self.index
            .tags(repo, last, n)?
            .ok_or(StoreError::NameUnknown)
    }

    /// Manifests of `repo` that name `subject` as their subject.
    pub fn referrers(&self, repo: &RepoName, subject: &Digest) -> Result<Vec<Referrer>> {
        Ok(self
            .index
            .referrers(repo, subject)?
            .into_iter()
            .map(|(digest, record)| Referrer { digest, record })
            .collect())
    }

    /// Digests a stored manifest references (what GC marks from it).
    pub fn references(&self, manifest: &Digest) -> Result<Vec<Digest>> {
        self.index.references(manifest)
    }

    // ---- verification ----

    /// Re-hashes every blob the index knows. Slow (reads everything): for `kache fsck` and tests.
    pub async fn verify(&self) -> Result<VerifyReport> {
        let (index, layout) = (self.index.clone(), self.layout.clone());
        blocking(move || {
            let mut report = VerifyReport::default();
            index.for_each_blob(|d, r| {
                report.blobs += 1;
                match fs::hash_file(&layout.blob(&d), d.algorithm()) {
                    Ok((actual, len)) if actual == d && len == r.size => report.bytes += len,
                    Ok((actual, len)) => report.bad.push(format!(
                        "{d}: file hashes to {actual} ({len} bytes, index says {})",
                        r.size
                    )),
                    Err(e) => report.bad.push(format!("{d}: {e}")),
                }
            })?;
            Ok(report)
        })
        .await
    }
}

/// Calls `f` with every `blobs/<alg>/<xx>/<hex>` file whose name is a valid digest, and its size.
fn for_each_blob_file(layout: &Layout, mut f: impl FnMut(Digest, u64) -> Result<()>) -> Result<()> {
    for alg in std::fs::read_dir(layout.blobs())? {
        let alg = alg?;
        let alg_name = alg.file_name().to_string_lossy().into_owned();
        for shard in std::fs::read_dir(alg.path())? {
            for file in std::fs::read_dir(shard?.path())? {
                let file = file?;
                let name = format!("{alg_name}:{}", file.file_name().to_string_lossy());
                match name.parse::<Digest>() {
                    Ok(d) if file.path() == layout.blob(&d) => f(d, file.metadata()?.len())?,
                    _ => {
                        tracing::warn!(path = %file.path().display(), "ignoring a file that is not a blob")
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
