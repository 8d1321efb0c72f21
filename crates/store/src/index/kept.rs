//! The images the cluster keeps, as the controller last reported them.

use kache_oci::RepoName;
use redb::{ReadableDatabase, ReadableTable};

use super::{Index, KEPT, key};
use crate::error::Result;

impl Index {
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
}
