//! The redb half of the store: which blobs exist, which repository may read them, manifests,
//! tags, references and uploads. Every multi-step change is one write transaction, so readers
//! and a crash only ever see a state before or after it. Write transactions are serialised by
//! redb, which is what keeps a manifest write and a blob delete from interleaving: a manifest
//! is accepted only if, inside its own transaction, every blob it needs is still linked.
//!
//! Every table is defined here; the reads and writes of each family are in a file of their own.

use std::path::Path;

use kache_oci::{Digest, RepoName};
use redb::{Database, MultimapTableDefinition, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};

mod access;
mod blobs;
#[cfg(any(test, feature = "fixtures"))]
mod fixtures;
mod gc;
mod kept;
mod manifests;
mod repositories;
mod tags;
mod tenancy;
mod uploads;

pub use blobs::BlobRecord;
#[cfg(any(test, feature = "fixtures"))]
pub(crate) use fixtures::Bulk;
pub(crate) use gc::{BlobId, Doomed, Eviction, KeptRef, View};
pub use manifests::ManifestRecord;
pub(crate) use manifests::NewManifest;
pub use tags::TagRecord;
pub(crate) use uploads::UploadRecord;

/// digest -> [`BlobRecord`]: every blob file the store holds.
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
/// `repo\0digest` -> link time: blobs a repository may serve (pushed, mounted or pulled there).
const LINKS: TableDefinition<&str, u64> = TableDefinition::new("links");
/// `repo\0digest` -> [`ManifestRecord`]; the bytes are the blob of the same digest.
const MANIFESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("manifests");
/// `repo\0tag` -> [`TagRecord`].
const TAGS: TableDefinition<&str, &[u8]> = TableDefinition::new("tags");
/// manifest digest -> every digest it references (config, layers, child manifests): what GC marks.
const REFS: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("refs");
/// `repo\0subject digest` -> digests of manifests whose `subject` it is.
const REFERRERS: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("referrers");
/// upload id -> [`UploadRecord`].
const UPLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("uploads");
/// digest -> when it was last served (unix seconds), flushed in batches: what expiry and GC read.
const ACCESS: TableDefinition<&str, u64> = TableDefinition::new("access");
/// `repo\0tag` or `repo\0digest` -> 1 if pinned, else 0: the images the cluster keeps (its
/// CachedImages, as the controller last reported them). Roots of the mark; pinned ones are never
/// evicted.
const KEPT: TableDefinition<&str, u8> = TableDefinition::new("kept");
/// cache repository -> its visibility ([`kache_wire::Visibility`]) and when it was learnt.
const VISIBILITY: TableDefinition<&str, &[u8]> = TableDefinition::new("visibility");
/// `repo\0namespace` -> when the namespace's credentials were verified and until when they hold.
const GRANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("grants");
/// digest -> when marked: blobs (and manifests) whose bytes came only through private
/// repositories. A mount that names no source never links them elsewhere: another repository
/// fetches them from its own upstream, which shows whether it may.
const SCOPED: TableDefinition<&str, u64> = TableDefinition::new("scoped");

fn key(repo: &RepoName, rest: &str) -> String {
    format!("{}\0{rest}", repo.as_str())
}

/// The key range of everything under `repo` (`\0` sorts before every name character, and `\x01`
/// right after it, so `a` never sees `a/b`'s keys).
fn repo_range(repo: &RepoName) -> std::ops::Range<String> {
    format!("{}\0", repo.as_str())..format!("{}\x01", repo.as_str())
}

fn suffix(k: &str) -> &str {
    k.split_once('\0').map_or("", |(_, s)| s)
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("index records always serialise")
}

fn dec<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| StoreError::Index(format!("corrupt index record: {e}")))
}

fn parse_digest(s: &str) -> Result<Digest> {
    s.parse()
        .map_err(|e| StoreError::Index(format!("corrupt digest in index: {e}")))
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Memory redb may use to cache index pages.
const INDEX_CACHE: usize = 8 << 20;

#[derive(Debug)]
pub(crate) struct Index {
    db: Database,
    /// Who may read what, as the tables say, in memory: every read of a cached repository asks.
    tenancy: tenancy::View,
}

impl Index {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        // redb's own cache would otherwise grow to 1 GiB as a collection reads the whole index;
        // the kernel's page cache keeps the file warm anyway.
        let db = Database::builder()
            .set_cache_size(INDEX_CACHE)
            .create(path)?;
        let tx = db.begin_write()?;
        // Create every table so readers never meet a missing one.
        tx.open_table(BLOBS)?;
        tx.open_table(LINKS)?;
        tx.open_table(MANIFESTS)?;
        tx.open_table(TAGS)?;
        tx.open_multimap_table(REFS)?;
        tx.open_multimap_table(REFERRERS)?;
        tx.open_table(UPLOADS)?;
        tx.open_table(ACCESS)?;
        tx.open_table(KEPT)?;
        tx.open_table(VISIBILITY)?;
        tx.open_table(GRANTS)?;
        tx.open_table(SCOPED)?;
        tx.commit()?;
        let tenancy = tenancy::View::load(&db)?;
        Ok(Index { db, tenancy })
    }

    fn write<T>(&self, f: impl FnOnce(&WriteTransaction) -> Result<T>) -> Result<T> {
        let tx = self.db.begin_write()?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }
}
