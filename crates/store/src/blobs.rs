//! Blobs: lookups scoped to a repository, writes verified before they are installed, mounts.

use std::path::PathBuf;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use kache_oci::{Algorithm, Digest, RepoName};

use crate::error::{Result, StoreError};
use crate::fs::{self, BlobWriter};
use crate::index::BlobRecord;
use crate::{Store, blocking};

/// A blob ready to be streamed: an open file and its length.
#[derive(Debug)]
pub struct BlobFile {
    pub file: tokio::fs::File,
    pub size: u64,
}

impl Store {
    /// The size of `digest` if `repo` may serve it.
    pub fn stat_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>> {
        Ok(self.find_blob(repo, digest)?.map(|(size, _)| size))
    }

    /// The size of `digest` for `repo` and, for a fetched blob still being committed, the
    /// temporary file that holds it. Such a blob is verified already and its requester has had
    /// every byte: the next request is answered as a hit, not a miss (nor a HEAD's 404).
    fn find_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<(u64, Option<PathBuf>)>> {
        let found = self.find_blob_unheld(repo, digest)?;
        if found.is_some() {
            self.gate.touch(digest);
        }
        Ok(found)
    }

    fn find_blob_unheld(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<(u64, Option<PathBuf>)>> {
        if !self.gate.read(digest) {
            return Ok(None);
        }
        if let Some(size) = self.index.linked_blob(repo, digest)? {
            return Ok(Some((size, None)));
        }
        if let Some((size, tmp)) = self.flights.verified(repo, digest) {
            return Ok(Some((size, Some(tmp))));
        }
        // Committed between the two lookups (the flight leaves the map after the index commit).
        Ok(self
            .index
            .linked_blob(repo, digest)?
            .map(|size| (size, None)))
    }

    /// Opens `digest` for reading if `repo` may serve it.
    pub async fn open_blob(&self, repo: &RepoName, digest: &Digest) -> Result<BlobFile> {
        let (size, tmp) = self
            .find_blob(repo, digest)?
            .ok_or(StoreError::BlobUnknown)?;
        let path = self.layout.blob(digest);
        let opened = match tmp {
            // Renamed into place in the meantime: the final path has the same bytes.
            Some(tmp) => match tokio::fs::File::open(tmp).await {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tokio::fs::File::open(&path).await
                }
                r => r,
            },
            None => tokio::fs::File::open(&path).await,
        };
        let file = match opened {
            Ok(f) => f,
            // Deleted between the lookup and the open (GC): the blob is simply unknown now.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::BlobUnknown);
            }
            Err(e) => return Err(e.into()),
        };
        Ok(BlobFile { file, size })
    }

    /// The path of a blob's file, for readers that stream it themselves.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.layout.blob(digest)
    }

    /// A writer for a new blob that must hash to a digest of `algorithm`.
    pub async fn blob_writer(
        &self,
        algorithm: Algorithm,
        limit: Option<u64>,
    ) -> Result<BlobWriter> {
        let path = self.layout.tmp().join(uuid::Uuid::new_v4().to_string());
        BlobWriter::create(path, algorithm, limit).await
    }

    /// Verifies what `writer` holds against `expected`, installs it and links it into `repo`.
    /// On a mismatch nothing is kept.
    pub async fn commit_blob(
        &self,
        writer: BlobWriter,
        repo: &RepoName,
        expected: &Digest,
    ) -> Result<u64> {
        let (tmp, actual, size) = writer.finish().await?;
        if actual != *expected {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(StoreError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        let _hold = self.gate.write(&actual).await;
        let (layout, index, repo, d) = (
            self.layout.clone(),
            self.index.clone(),
            repo.clone(),
            actual,
        );
        let new = blocking(move || {
            fs::install(&layout, &tmp, &d)?;
            index.add_blob(Some(&repo), &d, size)
        })
        .await?;
        self.added(new, size);
        Ok(size)
    }

    /// Stores a whole blob from a stream (monolithic push, pull-through).
    pub async fn put_blob<S, E>(&self, repo: &RepoName, expected: &Digest, body: S) -> Result<u64>
    where
        S: Stream<Item = std::result::Result<Bytes, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut w = self.blob_writer(expected.algorithm(), None).await?;
        let mut body = std::pin::pin!(body);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| StoreError::Body(std::io::Error::other(e)))?;
            w.write(&chunk).await?;
        }
        self.commit_blob(w, repo, expected).await
    }

    /// Cross-repository mount: links a blob of `from` (or of any repository, without `from`)
    /// into `repo`. None if there is nothing to mount.
    pub async fn mount_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: Option<&RepoName>,
    ) -> Result<Option<u64>> {
        // A blob being swept has nothing to mount: the client uploads it instead.
        let Some(_hold) = self.gate.try_write(digest) else {
            return Ok(None);
        };
        let (index, repo, digest, from) = (
            self.index.clone(),
            repo.clone(),
            digest.clone(),
            from.cloned(),
        );
        blocking(move || index.mount(&repo, &digest, from.as_ref())).await
    }

    /// Removes `digest` from `repo`. The file stays until GC finds nothing referencing it.
    pub async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        let (index, repo, digest) = (self.index.clone(), repo.clone(), digest.clone());
        if blocking(move || index.unlink_blob(&repo, &digest)).await? {
            Ok(())
        } else {
            Err(StoreError::BlobUnknown)
        }
    }

    /// The index record of a blob, whatever repository holds it.
    pub fn blob_record(&self, digest: &Digest) -> Result<Option<BlobRecord>> {
        self.index.blob(digest)
    }
}
