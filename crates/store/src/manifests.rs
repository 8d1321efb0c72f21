//! Manifests, with the tags that name them and the referrers that name them as their subject.

use bytes::Bytes;
use kache_oci::{Digest, ParsedManifest, Reference, RepoName};

use crate::error::{Result, StoreError};
use crate::fs;
use crate::index::{self, ManifestRecord, NewManifest, TagRecord};
use crate::{Store, blocking};

pub use kache_oci::MAX_MANIFEST_SIZE;

/// A manifest as served: its bytes, digest and media type.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// An entry of a referrers listing.
#[derive(Debug, Clone)]
pub struct Referrer {
    pub digest: Digest,
    pub record: ManifestRecord,
}

impl Store {
    /// Stores manifest `bytes` (already parsed) in `repo`, tagged when `reference` is a tag.
    /// Rejected with [`StoreError::ManifestBlobUnknown`] unless every config and layer blob is
    /// linked in `repo`; child manifests of an index may be absent (a cache fills them lazily).
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        bytes: Bytes,
        parsed: &ParsedManifest,
    ) -> Result<Digest> {
        self.store_manifest(repo, reference, bytes, parsed, true)
            .await
    }

    /// Stores a manifest fetched from upstream: its blobs are fetched on demand later, so
    /// none needs to be present now.
    pub async fn put_pulled_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        bytes: Bytes,
        parsed: &ParsedManifest,
    ) -> Result<Digest> {
        self.store_manifest(repo, reference, bytes, parsed, false)
            .await
    }

    async fn store_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        bytes: Bytes,
        parsed: &ParsedManifest,
        require_blobs: bool,
    ) -> Result<Digest> {
        let digest = match reference {
            Reference::Digest(d) => {
                let actual = Digest::compute(d.algorithm(), &bytes);
                if actual != *d {
                    return Err(StoreError::DigestMismatch {
                        expected: d.clone(),
                        actual,
                    });
                }
                actual
            }
            Reference::Tag(_) => Digest::sha256(&bytes),
        };
        let size = bytes.len() as u64;
        let record = ManifestRecord {
            media_type: parsed.media_type.clone(),
            size,
            artifact_type: parsed.effective_artifact_type().map(str::to_owned),
            subject: parsed.subject.as_ref().map(|s| s.digest.clone()),
            annotations: parsed.annotations.clone(),
            created: index::now(),
        };
        let required: Vec<Digest> = if require_blobs {
            parsed.required_blobs().map(|d| d.digest.clone()).collect()
        } else {
            Vec::new()
        };
        let references: Vec<Digest> = parsed.references().cloned().collect();
        let tag = match reference {
            Reference::Tag(t) => Some(t.as_str().to_owned()),
            Reference::Digest(_) => None,
        };

        // Everything it references is held until the index commits (gate.rs): a pushed manifest
        // is refused if the sweep is removing one of its blobs, a pulled one only refers to
        // blobs fetched on demand (again, if swept).
        let mut holds = Vec::with_capacity(references.len() + 1);
        for d in references.iter().chain(&required) {
            match self.gate.try_write(d) {
                Some(h) => holds.push(h),
                None if require_blobs => return Err(StoreError::ManifestBlobUnknown(d.clone())),
                None => {}
            }
        }
        // Refuse early, before any byte is written, so a rejected manifest leaves nothing. The
        // check inside the index transaction below stays the authoritative one (a concurrent
        // delete may land in between; its file is then an orphan for GC).
        for d in &required {
            if self.index.linked_blob(repo, d)?.is_none() {
                return Err(StoreError::ManifestBlobUnknown(d.clone()));
            }
        }
        holds.push(self.gate.write(&digest).await);
        let mut w = self.blob_writer(digest.algorithm(), None).await?;
        w.write(&bytes).await?;
        let (tmp, _, _) = w.finish().await?;
        let (layout, index, repo, d) = (
            self.layout.clone(),
            self.index.clone(),
            repo.clone(),
            digest.clone(),
        );
        let new = blocking(move || {
            let had_file = !fs::install(&layout, &tmp, &d)?;
            index.put_manifest(NewManifest {
                repo: &repo,
                digest: &d,
                record,
                tag: tag.as_deref(),
                required,
                references,
            })?;
            Ok(!had_file)
        })
        .await?;
        drop(holds);
        self.added(new, size);
        Ok(digest)
    }

    /// Resolves a tag or digest of `repo` to its manifest.
    pub async fn get_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<Manifest> {
        let manifest = self.find_manifest(repo, reference).await?;
        self.gate.touch(&manifest.digest);
        Ok(manifest)
    }

    async fn find_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<Manifest> {
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => {
                self.index
                    .tag(repo, t.as_str())?
                    .ok_or(StoreError::ManifestUnknown)?
                    .digest
            }
        };
        if !self.gate.read(&digest) {
            return Err(StoreError::ManifestUnknown);
        }
        let record = self
            .index
            .manifest(repo, &digest)?
            .ok_or(StoreError::ManifestUnknown)?;
        let bytes = match tokio::fs::read(self.layout.blob(&digest)).await {
            Ok(b) => Bytes::from(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::ManifestUnknown);
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Manifest {
            digest,
            media_type: record.media_type,
            bytes,
        })
    }

    /// The tag record of `repo:tag`, if any.
    pub fn tag(&self, repo: &RepoName, tag: &str) -> Result<Option<TagRecord>> {
        self.index.tag(repo, tag)
    }

    /// Marks `repo:tag` as confirmed by its upstream now (the tag TTL starts again).
    pub async fn touch_tag(&self, repo: &RepoName, tag: &str) -> Result<()> {
        let (index, repo, tag) = (self.index.clone(), repo.clone(), tag.to_owned());
        blocking(move || index.touch_tag(&repo, &tag)).await
    }

    /// Deletes a manifest by digest (with its tags), or just a tag.
    pub async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        let (index, repo, reference) = (self.index.clone(), repo.clone(), reference.clone());
        let found = blocking(move || match &reference {
            Reference::Digest(d) => index.delete_manifest(&repo, d),
            Reference::Tag(t) => index.delete_tag(&repo, t.as_str()),
        })
        .await?;
        if found {
            Ok(())
        } else {
            Err(StoreError::ManifestUnknown)
        }
    }

    /// Up to `n` tags of `repo` after `last`, in lexical order.
    pub fn list_tags(&self, repo: &RepoName, last: Option<&str>, n: usize) -> Result<Vec<String>> {
        self.index
            .tags(repo, last, n)?
            .ok_or(StoreError::NameUnknown)
    }

    /// Up to `n` repository names after `last`, in lexical order: every repository with a blob
    /// or manifest in the store (the catalog).
    pub fn repositories(&self, last: Option<&str>, n: usize) -> Result<Vec<String>> {
        self.index.repositories(last, n)
    }

    /// Manifests of `repo` that name `subject` as their subject.
    pub fn referrers(&self, repo: &RepoName, subject: &Digest) -> Result<Vec<Referrer>> {
        Ok(self
            .index
            .referrers(repo, subject)?
            .into_iter()
            .map(|(digest, record)| Referrer { digest, record })
            .collect())
    }

    /// Digests a stored manifest references (what GC marks from it).
    pub fn references(&self, manifest: &Digest) -> Result<Vec<Digest>> {
        self.index.references(manifest)
    }
}
