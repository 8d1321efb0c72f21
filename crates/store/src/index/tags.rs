//! Tags: where each points, when it was last confirmed, and their listing.

use kache_oci::{Digest, RepoName};
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};

use super::{Index, LINKS, MANIFESTS, TAGS, dec, enc, key, now, repo_range, suffix};
use crate::error::Result;

/// Where a tag points.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: Digest,
    /// When it was pushed, pulled from upstream, or last confirmed upstream (unix seconds).
    pub updated: u64,
}

impl Index {
    pub(crate) fn tag(&self, repo: &RepoName, tag: &str) -> Result<Option<TagRecord>> {
        let tx = self.db.begin_read()?;
        match tx.open_table(TAGS)?.get(key(repo, tag).as_str())? {
            Some(v) => Ok(Some(dec(v.value())?)),
            None => Ok(None),
        }
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
}
