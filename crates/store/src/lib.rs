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
//! The registry speaks to a store through [`Storage`] alone (storage.rs): [`Store`] is its
//! first implementation, and `suite` (feature `suite`) the tests any implementation runs, this
//! one included.
//!
//! On disk, the data directory holds the blob files, writes in progress, upload sessions and the
//! index: `Layout` (fs.rs) draws the tree, beside the code that builds each of its paths.
//!
//! A blob put into a repository and read back:
//!
//! ```
//! use bytes::Bytes;
//! use kache_oci::{Digest, RepoName};
//! use kache_store::{Recovery, Store};
//! use tokio::io::AsyncReadExt;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let (store, recovery) = Store::open(dir.path()).unwrap();
//! assert_eq!(recovery, Recovery::default(), "a new store has nothing to repair");
//!
//! tokio::runtime::Runtime::new().unwrap().block_on(async {
//!     let repo: RepoName = "team/app".parse().unwrap();
//!     let digest = Digest::sha256(b"a layer");
//!     let body = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from("a layer"))]);
//!     assert_eq!(store.put_blob(&repo, &digest, body).await.unwrap(), 7);
//!
//!     let mut blob = store.open_blob(&repo, &digest).await.unwrap();
//!     let mut bytes = Vec::new();
//!     blob.file.read_to_end(&mut bytes).await.unwrap();
//!     assert_eq!(bytes, b"a layer");
//!     // Only repositories that hold it (pushed, mounted or pulled there) may serve it.
//!     let other: RepoName = "team/other".parse().unwrap();
//!     assert_eq!(store.stat_blob(&other, &digest).unwrap(), None);
//! });
//! ```

mod access;
mod blobs;
mod error;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
mod flight;
mod fs;
mod gate;
mod gc;
mod index;
mod manifests;
mod read;
mod recovery;
mod space;
mod storage;
#[cfg(any(test, feature = "suite"))]
pub mod suite;
mod upload;
mod verify;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kache_oci::Digest;

pub use blobs::BlobFile;
pub use error::{Result, StoreError};
pub use flight::{
    ByteStream, FetchError, FetchFailure, FlightStream, Follow, Sharing, Source, SourceFn,
};
pub use fs::BlobWriter;
pub use gc::{DEFAULT_DUTY, GcOptions, GcReport, KeptImage, Pressure};
pub use index::{BlobRecord, ManifestRecord, TagRecord};
pub use manifests::{MAX_MANIFEST_SIZE, Manifest, Referrer};
pub use read::read_range;
pub use recovery::Recovery;
pub use space::{Limits, MinFree, SpaceError, parse_size};
pub use storage::{Body, BodyError, Progress, Storage};
pub use upload::UploadStatus;
pub use verify::{VerifyProgress, VerifyReport};

use fs::Layout;
use gate::Gate;
use index::Index;

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
        let (rec, total) = recovery::recover(&layout, &index)?;
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
}

#[cfg(test)]
mod tests;
