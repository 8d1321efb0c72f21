//! Upload sessions, and the transaction that turns one into a blob.

use kache_oci::{Digest, RepoName};
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};

use super::blobs::record_blob;
use super::{Index, LINKS, UPLOADS, dec, enc, key, now};
use crate::error::Result;

/// An upload session; its bytes are in `uploads/<id>`, whose length is the offset.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadRecord {
    pub repo: String,
    pub started: u64,
    pub updated: u64,
}

impl Index {
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
            let new = record_blob(tx, &d, size)?;
            tx.open_table(LINKS)?
                .insert(key(repo, &d).as_str(), now())?;
            super::tenancy::note_link(tx, repo, &d)?;
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
