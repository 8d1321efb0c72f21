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

impl Store {
    /// Re-hashes every blob the index knows. Slow (reads everything): for `kache fsck` and tests.
    pub async fn verify(&self) -> Result<VerifyReport> {
        let (index, layout) = (self.index.clone(), self.layout.clone());
        blocking(move || {
            let mut report = VerifyReport::default();
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
            })?;
            Ok(report)
        })
        .await
    }
}
