//! Access times: noted by the gate as blobs and manifests are served, flushed to the index.

use kache_oci::Digest;

use crate::error::Result;
use crate::{Store, blocking};

impl Store {
    /// Writes the access times gathered since the last flush. Called periodically.
    pub async fn flush_access(&self) -> Result<usize> {
        let _flushing = self.flush_lock.lock().await;
        self.flush_access_locked().await
    }

    pub(crate) async fn flush_access_locked(&self) -> Result<usize> {
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
}
