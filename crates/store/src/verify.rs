//! The full check behind `kache fsck`: every blob re-hashed against its name.

use crate::error::Result;
use crate::{Store, blocking, fs};

/// The result of [`Store::verify`]: every blob re-hashed against its name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub blobs: usize,
    pub bytes: u64,
    /// Index entries whose file is missing or whose bytes do not hash to the digest.
    pub bad: Vec<String>,
}

/// How far [`Store::verify`] has come: passed after every blob, so a caller can say how far a
/// check of hours has got.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VerifyProgress {
    /// Blobs checked so far, of `total`.
    pub checked: u64,
    /// The blobs the index held when the check began.
    pub total: u64,
    /// Bytes read so far.
    pub bytes: u64,
    /// Blobs found bad so far.
    pub bad: u64,
}

impl Store {
    /// Re-hashes every blob the index knows. Slow (reads everything): for `kache fsck` and
    /// tests.
    pub async fn verify(&self) -> Result<VerifyReport> {
        self.verify_with(|_| {}).await
    }

    /// [`verify`](Self::verify), calling `progress` after each blob (on the blocking thread
    /// that reads them: keep it short).
    pub async fn verify_with(
        &self,
        mut progress: impl FnMut(&VerifyProgress) + Send + 'static,
    ) -> Result<VerifyReport> {
        let (index, layout) = (self.index.clone(), self.layout.clone());
        blocking(move || {
            let mut report = VerifyReport::default();
            let mut at = VerifyProgress {
                total: index.blob_count()?,
                ..VerifyProgress::default()
            };
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
                at.checked += 1;
                at.bytes = report.bytes;
                at.bad = report.bad.len() as u64;
                progress(&at);
            })?;
            Ok(report)
        })
        .await
    }
}
