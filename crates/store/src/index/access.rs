//! When each blob or manifest was last served.

use kache_oci::Digest;
use redb::ReadableDatabase;

use super::{ACCESS, Index};
use crate::error::{Result, StoreError};

impl Index {
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
}
