//! Writes only tests and synthetic stores make, past the rules the other writes keep.

use kache_oci::{Digest, RepoName};

use super::{
    BLOBS, BlobRecord, Index, LINKS, MANIFESTS, ManifestRecord, REFS, TAGS, TagRecord, enc, key,
    now,
};
use crate::error::Result;

/// Records of a synthetic store, written together ([`crate::fixtures`]).
#[derive(Debug, Default)]
pub(crate) struct Bulk {
    pub blobs: Vec<(Digest, BlobRecord)>,
    pub links: Vec<(RepoName, Digest)>,
    pub manifests: Vec<(RepoName, Digest, ManifestRecord, Vec<Digest>)>,
    pub tags: Vec<(RepoName, String, TagRecord)>,
}

impl Bulk {
    pub(crate) fn len(&self) -> usize {
        self.blobs.len() + self.links.len() + self.manifests.len() + self.tags.len()
    }
}

impl Index {
    /// Makes every blob and manifest look written and last used `age_secs` ago (tests of the
    /// grace period).
    #[cfg(test)]
    pub(crate) fn backdate_all(&self, age_secs: u64) -> Result<()> {
        use redb::ReadableTable;
        use serde::{Deserialize, Serialize};

        use super::{ACCESS, dec};

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

    /// Writes a batch of a synthetic store in one transaction ([`crate::fixtures`]).
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
}
