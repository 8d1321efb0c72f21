//! The redb half of the store: which blobs exist, which repository may read them, manifests,
//! tags, references and uploads. Every multi-step change is one write transaction, so readers
//! and a crash only ever see a state before or after it. Write transactions are serialised by
//! redb, which is what keeps a manifest write and a blob delete from interleaving: a manifest
//! is accepted only if, inside its own transaction, every blob it needs is still linked.

use std::collections::BTreeMap;
use std::path::Path;

use kache_oci::{Digest, RepoName};
use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};

mod gc;
pub(crate) use gc::{BlobId, Doomed, Eviction, KeptRef, View};

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

/// A blob file the store holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlobRecord {
    pub size: u64,
    /// When it was written (unix seconds): GC spares blobs younger than its grace period.
    pub created: u64,
}

/// A manifest of one repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub media_type: String,
    pub size: u64,
    #[serde(default)]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub subject: Option<Digest>,
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
    pub created: u64,
}

/// Where a tag points.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: Digest,
    /// When it was pushed, pulled from upstream, or last confirmed upstream (unix seconds).
    pub updated: u64,
}

/// An upload session; its bytes are in `uploads/<id>`, whose length is the offset.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadRecord {
    pub repo: String,
    pub started: u64,
    pub updated: u64,
}

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

/// Records of a synthetic store, written together (fixtures.rs).
#[cfg(any(test, feature = "fixtures"))]
#[derive(Debug, Default)]
pub(crate) struct Bulk {
    pub blobs: Vec<(Digest, BlobRecord)>,
    pub links: Vec<(RepoName, Digest)>,
    pub manifests: Vec<(RepoName, Digest, ManifestRecord, Vec<Digest>)>,
    pub tags: Vec<(RepoName, String, TagRecord)>,
}

#[cfg(any(test, feature = "fixtures"))]
impl Bulk {
    pub(crate) fn len(&self) -> usize {
        self.blobs.len() + self.links.len() + self.manifests.len() + self.tags.len()
    }
}

/// Memory redb may use to cache index pages.
const INDEX_CACHE: usize = 8 << 20;

/// What to record for a manifest in one transaction.
#[derive(Debug)]
pub(crate) struct NewManifest<'a> {
    pub repo: &'a RepoName,
    pub digest: &'a Digest,
    pub record: ManifestRecord,
    pub tag: Option<&'a str>,
    pub required: Vec<Digest>,
    pub references: Vec<Digest>,
}

#[derive(Debug)]
pub(crate) struct Index {
    db: Database,
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
        tx.commit()?;
        Ok(Index { db })
    }

    fn write<T>(&self, f: impl FnOnce(&WriteTransaction) -> Result<T>) -> Result<T> {
        let tx = self.db.begin_write()?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    // ---- blobs ----

    /// The size of `digest` if `repo` may serve it.
    pub(crate) fn linked_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>> {
        let tx = self.db.begin_read()?;
        if tx
            .open_table(LINKS)?
            .get(key(repo, &digest.to_string()).as_str())?
            .is_none()
        {
            return Ok(None);
        }
        let blobs = tx.open_table(BLOBS)?;
        match blobs.get(digest.to_string().as_str())? {
            Some(v) => Ok(Some(dec::<BlobRecord>(v.value())?.size)),
            None => Ok(None),
        }
    }

    pub(crate) fn blob(&self, digest: &Digest) -> Result<Option<BlobRecord>> {
        let tx = self.db.begin_read()?;
        let blobs = tx.open_table(BLOBS)?;
        match blobs.get(digest.to_string().as_str())? {
            Some(v) => Ok(Some(dec(v.value())?)),
            None => Ok(None),
        }
    }

    /// Records a blob whose file is in place, and links it to `repo`. Returns whether the
    /// blob is new to the store.
    pub(crate) fn add_blob(
        &self,
        repo: Option<&RepoName>,
        digest: &Digest,
        size: u64,
    ) -> Result<bool> {
        self.write(|tx| {
            let d = digest.to_string();
            let mut blobs = tx.open_table(BLOBS)?;
            let new = blobs.get(d.as_str())?.is_none();
            if new {
                blobs.insert(
                    d.as_str(),
                    enc(&BlobRecord {
                        size,
                        created: now(),
                    })
                    .as_slice(),
                )?;
            }
            if let Some(repo) = repo {
                tx.open_table(LINKS)?
                    .insert(key(repo, &d).as_str(), now())?;
            }
            Ok(new)
        })
    }

    /// Links a blob `from` holds (or, without `from`, any blob the store holds) into `repo`.
    pub(crate) fn mount(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: Option<&RepoName>,
    ) -> Result<Option<u64>> {
        // Most mounts find nothing (every cold pull-through miss asks first): answer those from a
        // read transaction, without paying a write commit's fsync. The write re-checks.
        {
            let d = digest.to_string();
            let tx = self.db.begin_read()?;
            let source_linked = match from {
                Some(from) => tx.open_table(LINKS)?.get(key(from, &d).as_str())?.is_some(),
                None => true,
            };
            if !source_linked || tx.open_table(BLOBS)?.get(d.as_str())?.is_none() {
                return Ok(None);
            }
        }
        self.write(|tx| {
            let d = digest.to_string();
            let mut links = tx.open_table(LINKS)?;
            if let Some(from) = from
                && links.get(key(from, &d).as_str())?.is_none()
            {
                return Ok(None);
            }
            let Some(rec) = tx
                .open_table(BLOBS)?
                .get(d.as_str())?
                .map(|v| dec::<BlobRecord>(v.value()))
                .transpose()?
            else {
                return Ok(None);
            };
            links.insert(key(repo, &d).as_str(), now())?;
            Ok(Some(rec.size))
        })
    }

    pub(crate) fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        self.write(|tx| {
            Ok(tx
                .open_table(LINKS)?
                .remove(key(repo, &digest.to_string()).as_str())?
                .is_some())
        })
    }

    /// Calls `f` with every blob record, in digest order, for recovery, size accounting and
    /// verification (one at a time: a store of 100,000 blobs is not held in memory for it).
    pub(crate) fn for_each_blob(&self, mut f: impl FnMut(Digest, BlobRecord)) -> Result<()> {
        let tx = self.db.begin_read()?;
        for item in tx.open_table(BLOBS)?.iter()? {
            let (k, v) = item?;
            f(parse_digest(k.value())?, dec(v.value())?);
        }
        Ok(())
    }

    /// Forgets blobs whose files are gone (and their links), in one transaction.
    pub(crate) fn forget_blobs(&self, digests: &[Digest]) -> Result<()> {
        if digests.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            let mut blobs = tx.open_table(BLOBS)?;
            let mut links = tx.open_table(LINKS)?;
            for d in digests {
                let d = d.to_string();
                blobs.remove(d.as_str())?;
                links.retain(|k, _| suffix(k) != d)?;
            }
            Ok(())
        })
    }

    /// Records when blobs were last served.
    pub(crate) fn record_access(&self, accesses: &[(Digest, u64)]) -> Result<()> {
        let mut tx = self.db.begin_write()?;
        // Access times are advisory: losing the last batch to a crash costs nothing, so this
        // commit skips the fsync that every other commit pays.
        tx.set_durability(redb::Durability::None)
            .map_err(StoreError::index)?;
        {
            let mut t = tx.open_table(ACCESS)?;
            for (d, at) in accesses {
                t.insert(d.to_string().as_str(), *at)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub(crate) fn last_access(&self, digest: &Digest) -> Result<Option<u64>> {
        let tx = self.db.begin_read()?;
        Ok(tx
            .open_table(ACCESS)?
            .get(digest.to_string().as_str())?
            .map(|v| v.value()))
    }

    // ---- manifests and tags ----

    pub(crate) fn put_manifest(&self, m: NewManifest<'_>) -> Result<()> {
        self.write(|tx| {
            let d = m.digest.to_string();
            {
                let links = tx.open_table(LINKS)?;
                let blobs = tx.open_table(BLOBS)?;
                for r in &m.required {
                    let rs = r.to_string();
                    if links.get(key(m.repo, &rs).as_str())?.is_none()
                        || blobs.get(rs.as_str())?.is_none()
                    {
                        return Err(StoreError::ManifestBlobUnknown(r.clone()));
                    }
                }
            }
            let mut blobs = tx.open_table(BLOBS)?;
            if blobs.get(d.as_str())?.is_none() {
                blobs.insert(
                    d.as_str(),
                    enc(&BlobRecord {
                        size: m.record.size,
                        created: now(),
                    })
                    .as_slice(),
                )?;
            }
            let mut refs = tx.open_multimap_table(REFS)?;
            for r in &m.references {
                refs.insert(d.as_str(), r.to_string().as_str())?;
            }
            if let Some(subject) = &m.record.subject {
                tx.open_multimap_table(REFERRERS)?
                    .insert(key(m.repo, &subject.to_string()).as_str(), d.as_str())?;
            }
            tx.open_table(MANIFESTS)?
                .insert(key(m.repo, &d).as_str(), enc(&m.record).as_slice())?;
            if let Some(tag) = m.tag {
                let rec = TagRecord {
                    digest: m.digest.clone(),
                    updated: now(),
                };
                tx.open_table(TAGS)?
                    .insert(key(m.repo, tag).as_str(), enc(&rec).as_slice())?;
            }
            Ok(())
        })
    }

    pub(crate) fn tag(&self, repo: &RepoName, tag: &str) -> Result<Option<TagRecord>> {
        let tx = self.db.begin_read()?;
        match tx.open_table(TAGS)?.get(key(repo, tag).as_str())? {
            Some(v) => Ok(Some(dec(v.value())?)),
            None => Ok(None),
        }
    }

    pub(crate) fn manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<ManifestRecord>> {
        let tx = self.db.begin_read()?;
        match tx
            .open_table(MANIFESTS)?
            .get(key(repo, &digest.to_string()).as_str())?
        {
            Some(v) => Ok(Some(dec(v.value())?)),
            None => Ok(None),
        }
    }

    /// Removes a manifest from `repo`, with every tag of `repo` pointing at it and its entry
    /// in the referrers of its subject.
    pub(crate) fn delete_manifest(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        self.write(|tx| {
            let d = digest.to_string();
            let Some(rec) = tx
                .open_table(MANIFESTS)?
                .remove(key(repo, &d).as_str())?
                .map(|v| dec::<ManifestRecord>(v.value()))
                .transpose()?
            else {
                return Ok(false);
            };
            let mut tags = tx.open_table(TAGS)?;
            let mut doomed = Vec::new();
            let range = repo_range(repo);
            for item in tags.range(range.start.as_str()..range.end.as_str())? {
                let (k, v) = item?;
                if dec::<TagRecord>(v.value())?.digest == *digest {
                    doomed.push(k.value().to_owned());
                }
            }
            for k in doomed {
                tags.remove(k.as_str())?;
            }
            if let Some(subject) = rec.subject {
                tx.open_multimap_table(REFERRERS)?
                    .remove(key(repo, &subject.to_string()).as_str(), d.as_str())?;
            }
            Ok(true)
        })
    }

    pub(crate) fn touch_tag(&self, repo: &RepoName, tag: &str) -> Result<()> {
        self.write(|tx| {
            let mut tags = tx.open_table(TAGS)?;
            let k = key(repo, tag);
            let rec = tags
                .get(k.as_str())?
                .map(|v| dec::<TagRecord>(v.value()))
                .transpose()?;
            if let Some(mut rec) = rec {
                rec.updated = now();
                tags.insert(k.as_str(), enc(&rec).as_slice())?;
            }
            Ok(())
        })
    }

    pub(crate) fn delete_tag(&self, repo: &RepoName, tag: &str) -> Result<bool> {
        self.write(|tx| {
            Ok(tx
                .open_table(TAGS)?
                .remove(key(repo, tag).as_str())?
                .is_some())
        })
    }

    /// Tags of `repo` in lexical order after `last`, at most `n`; None if the repository is
    /// unknown (holds no tag, manifest or blob).
    pub(crate) fn tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: usize,
    ) -> Result<Option<Vec<String>>> {
        let tx = self.db.begin_read()?;
        let tags = tx.open_table(TAGS)?;
        let range = repo_range(repo);
        let start = match last {
            Some(l) => format!("{}\0{l}\0", repo.as_str()),
            None => range.start.clone(),
        };
        let mut out = Vec::new();
        for item in tags.range(start.as_str()..range.end.as_str())?.take(n) {
            out.push(suffix(item?.0.value()).to_owned());
        }
        if out.is_empty()
            && tags
                .range(range.start.as_str()..range.end.as_str())?
                .next()
                .is_none()
        {
            let known = tx
                .open_table(MANIFESTS)?
                .range(range.start.as_str()..range.end.as_str())?
                .next()
                .is_some()
                || tx
                    .open_table(LINKS)?
                    .range(range.start.as_str()..range.end.as_str())?
                    .next()
                    .is_some();
            if !known {
                return Ok(None);
            }
        }
        Ok(Some(out))
    }

    /// Manifests of `repo` whose subject is `subject`.
    pub(crate) fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<Vec<(Digest, ManifestRecord)>> {
        let tx = self.db.begin_read()?;
        let manifests = tx.open_table(MANIFESTS)?;
        let mut out = Vec::new();
        for item in tx
            .open_multimap_table(REFERRERS)?
            .get(key(repo, &subject.to_string()).as_str())?
        {
            let d = item?.value().to_owned();
            if let Some(v) = manifests.get(key(repo, &d).as_str())? {
                out.push((parse_digest(&d)?, dec(v.value())?));
            }
        }
        Ok(out)
    }

    /// Digests a manifest references, as recorded when it was pushed.
    pub(crate) fn references(&self, manifest: &Digest) -> Result<Vec<Digest>> {
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        for item in tx
            .open_multimap_table(REFS)?
            .get(manifest.to_string().as_str())?
        {
            out.push(parse_digest(item?.value())?);
        }
        Ok(out)
    }

    /// Makes every blob and manifest look written and last used `age_secs` ago (tests of the
    /// grace period).
    #[cfg(test)]
    pub(crate) fn backdate_all(&self, age_secs: u64) -> Result<()> {
        fn backdate<T: Serialize + for<'de> Deserialize<'de>>(
            table: &mut redb::Table<&str, &[u8]>,
            set: impl Fn(&mut T),
        ) -> Result<()> {
            let all: Vec<(String, T)> = table
                .iter()?
                .map(|i| {
                    let (k, v) = i?;
                    Ok((k.value().to_owned(), dec(v.value())?))
                })
                .collect::<Result<_>>()?;
            for (k, mut rec) in all {
                set(&mut rec);
                table.insert(k.as_str(), enc(&rec).as_slice())?;
            }
            Ok(())
        }
        let then = now().saturating_sub(age_secs);
        self.write(|tx| {
            backdate(&mut tx.open_table(BLOBS)?, |r: &mut BlobRecord| {
                r.created = then
            })?;
            backdate(&mut tx.open_table(MANIFESTS)?, |r: &mut ManifestRecord| {
                r.created = then
            })?;
            tx.open_table(ACCESS)?.retain(|_, _| false)?;
            Ok(())
        })
    }

    /// Writes a batch of a synthetic store in one transaction (fixtures.rs).
    #[cfg(any(test, feature = "fixtures"))]
    pub(crate) fn bulk(&self, b: Bulk) -> Result<()> {
        self.write(|tx| {
            let mut blobs = tx.open_table(BLOBS)?;
            for (d, rec) in &b.blobs {
                blobs.insert(d.to_string().as_str(), enc(rec).as_slice())?;
            }
            let mut links = tx.open_table(LINKS)?;
            for (repo, d) in &b.links {
                links.insert(key(repo, &d.to_string()).as_str(), now())?;
            }
            let mut manifests = tx.open_table(MANIFESTS)?;
            let mut refs = tx.open_multimap_table(REFS)?;
            for (repo, d, rec, references) in &b.manifests {
                let ds = d.to_string();
                manifests.insert(key(repo, &ds).as_str(), enc(rec).as_slice())?;
                for r in references {
                    refs.insert(ds.as_str(), r.to_string().as_str())?;
                }
            }
            let mut tags = tx.open_table(TAGS)?;
            for (repo, tag, rec) in &b.tags {
                tags.insert(key(repo, tag).as_str(), enc(rec).as_slice())?;
            }
            Ok(())
        })
    }

    // ---- images the cluster keeps ----

    /// Replaces the kept list: `(repo, tag or digest, pinned)`.
    pub(crate) fn set_kept(&self, kept: &[(RepoName, String, bool)]) -> Result<()> {
        self.write(|tx| {
            let mut t = tx.open_table(KEPT)?;
            t.retain(|_, _| false)?;
            for (repo, reference, pinned) in kept {
                t.insert(key(repo, reference).as_str(), u8::from(*pinned))?;
            }
            Ok(())
        })
    }

    pub(crate) fn kept(&self) -> Result<Vec<(String, String, bool)>> {
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        for item in tx.open_table(KEPT)?.iter()? {
            let (k, v) = item?;
            let (repo, reference) = k.value().split_once('\0').unwrap_or((k.value(), ""));
            out.push((repo.to_owned(), reference.to_owned(), v.value() != 0));
        }
        Ok(out)
    }

    // ---- uploads ----

    pub(crate) fn put_upload(&self, id: &str, rec: &UploadRecord) -> Result<()> {
        self.write(|tx| {
            tx.open_table(UPLOADS)?.insert(id, enc(rec).as_slice())?;
            Ok(())
        })
    }

    pub(crate) fn upload(&self, id: &str) -> Result<Option<UploadRecord>> {
        let tx = self.db.begin_read()?;
        match tx.open_table(UPLOADS)?.get(id)? {
            Some(v) => Ok(Some(dec(v.value())?)),
            None => Ok(None),
        }
    }

    pub(crate) fn remove_upload(&self, id: &str) -> Result<bool> {
        self.write(|tx| Ok(tx.open_table(UPLOADS)?.remove(id)?.is_some()))
    }

    /// Finishes an upload in one transaction: the upload is gone and the blob is recorded and
    /// linked, or neither.
    pub(crate) fn complete_upload(
        &self,
        id: &str,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<bool> {
        self.write(|tx| {
            tx.open_table(UPLOADS)?.remove(id)?;
            let d = digest.to_string();
            let mut blobs = tx.open_table(BLOBS)?;
            let new = blobs.get(d.as_str())?.is_none();
            if new {
                blobs.insert(
                    d.as_str(),
                    enc(&BlobRecord {
                        size,
                        created: now(),
                    })
                    .as_slice(),
                )?;
            }
            tx.open_table(LINKS)?
                .insert(key(repo, &d).as_str(), now())?;
            Ok(new)
        })
    }

    pub(crate) fn uploads(&self) -> Result<Vec<(String, UploadRecord)>> {
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        for item in tx.open_table(UPLOADS)?.iter()? {
            let (k, v) = item?;
            out.push((k.value().to_owned(), dec(v.value())?));
        }
        Ok(out)
    }
}
