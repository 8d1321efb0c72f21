//! Blobs and their links: which files the store holds and which repository may serve each.

use kache_oci::{Digest, RepoName};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{BLOBS, Index, LINKS, SCOPED, dec, enc, key, now, parse_digest, suffix, tenancy};
use crate::error::Result;

/// Adds the record of `digest`, a file now in place, unless the store has one already; whether
/// it is new. Pushes, pulls and manifests all come this way, in their own transactions.
pub(super) fn record_blob(tx: &WriteTransaction, digest: &str, size: u64) -> Result<bool> {
    let mut blobs = tx.open_table(BLOBS)?;
    let new = blobs.get(digest)?.is_none();
    if new {
        blobs.insert(
            digest,
            enc(&BlobRecord {
                size,
                created: now(),
            })
            .as_slice(),
        )?;
    }
    Ok(new)
}

/// A blob file the store holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlobRecord {
    pub size: u64,
    /// When it was written (unix seconds): GC spares blobs younger than its grace period.
    pub created: u64,
}

impl Index {
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
            let new = record_blob(tx, &d, size)?;
            if let Some(repo) = repo {
                tx.open_table(LINKS)?
                    .insert(key(repo, &d).as_str(), now())?;
                tenancy::note_link(tx, repo, &d)?;
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
                None => !tenancy::is_scoped(&tx, &d)?,
            };
            if !source_linked || tx.open_table(BLOBS)?.get(d.as_str())?.is_none() {
                return Ok(None);
            }
        }
        self.write(|tx| {
            let d = digest.to_string();
            let mut links = tx.open_table(LINKS)?;
            match from {
                Some(from) if links.get(key(from, &d).as_str())?.is_none() => return Ok(None),
                None if tx.open_table(SCOPED)?.get(d.as_str())?.is_some() => return Ok(None),
                _ => {}
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

    /// Records blob files found in place without an index entry, all in one transaction (one
    /// commit for a whole recovery, not one per file).
    pub(crate) fn adopt_blobs(&self, found: &[(Digest, u64)]) -> Result<()> {
        if found.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            for (d, size) in found {
                record_blob(tx, &d.to_string(), *size)?;
            }
            Ok(())
        })
    }

    /// How many blobs the index holds.
    pub(crate) fn blob_count(&self) -> Result<u64> {
        Ok(self.db.begin_read()?.open_table(BLOBS)?.len()?)
    }

    /// Forgets blobs whose files are gone (and their links), in one transaction.
    pub(crate) fn forget_blobs(&self, digests: &[Digest]) -> Result<()> {
        if digests.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            let mut blobs = tx.open_table(BLOBS)?;
            let mut links = tx.open_table(LINKS)?;
            let mut scoped = tx.open_table(SCOPED)?;
            for d in digests {
                let d = d.to_string();
                blobs.remove(d.as_str())?;
                scoped.remove(d.as_str())?;
                links.retain(|k, _| suffix(k) != d)?;
            }
            Ok(())
        })
    }
}
