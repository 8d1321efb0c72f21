//! Manifests, what each references, and the referrers of their subjects.

use std::collections::BTreeMap;

use kache_oci::{Digest, RepoName};
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};

use super::blobs::record_blob;
use super::{
    BLOBS, Index, LINKS, MANIFESTS, REFERRERS, REFS, TAGS, TagRecord, dec, enc, key, now,
    parse_digest, repo_range,
};
use crate::error::{Result, StoreError};

/// A manifest of one repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub media_type: String,
    pub size: u64,
    #[serde(default)]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub subject: Option<Digest>,
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
    pub created: u64,
}

/// What to record for a manifest in one transaction.
#[derive(Debug)]
pub(crate) struct NewManifest<'a> {
    pub repo: &'a RepoName,
    pub digest: &'a Digest,
    pub record: ManifestRecord,
    pub tag: Option<&'a str>,
    pub required: Vec<Digest>,
    pub references: Vec<Digest>,
}

impl Index {
    pub(crate) fn put_manifest(&self, m: NewManifest<'_>) -> Result<()> {
        self.write(|tx| {
            let d = m.digest.to_string();
            {
                let links = tx.open_table(LINKS)?;
                let blobs = tx.open_table(BLOBS)?;
                for r in &m.required {
                    let rs = r.to_string();
                    if links.get(key(m.repo, &rs).as_str())?.is_none()
                        || blobs.get(rs.as_str())?.is_none()
                    {
                        return Err(StoreError::ManifestBlobUnknown(r.clone()));
                    }
                }
            }
            record_blob(tx, &d, m.record.size)?;
            super::tenancy::note_link(tx, m.repo, &d)?;
            let mut refs = tx.open_multimap_table(REFS)?;
            for r in &m.references {
                refs.insert(d.as_str(), r.to_string().as_str())?;
            }
            if let Some(subject) = &m.record.subject {
                tx.open_multimap_table(REFERRERS)?
                    .insert(key(m.repo, &subject.to_string()).as_str(), d.as_str())?;
            }
            tx.open_table(MANIFESTS)?
                .insert(key(m.repo, &d).as_str(), enc(&m.record).as_slice())?;
            if let Some(tag) = m.tag {
                let rec = TagRecord {
                    digest: m.digest.clone(),
                    updated: now(),
                };
                tx.open_table(TAGS)?
                    .insert(key(m.repo, tag).as_str(), enc(&rec).as_slice())?;
            }
            Ok(())
        })
    }

    pub(crate) fn manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<ManifestRecord>> {
        let tx = self.db.begin_read()?;
        match tx
            .open_table(MANIFESTS)?
            .get(key(repo, &digest.to_string()).as_str())?
        {
            Some(v) => Ok(Some(dec(v.value())?)),
            None => Ok(None),
        }
    }

    /// Removes a manifest from `repo`, with every tag of `repo` pointing at it and its entry
    /// in the referrers of its subject.
    pub(crate) fn delete_manifest(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        self.write(|tx| {
            let d = digest.to_string();
            let Some(rec) = tx
                .open_table(MANIFESTS)?
                .remove(key(repo, &d).as_str())?
                .map(|v| dec::<ManifestRecord>(v.value()))
                .transpose()?
            else {
                return Ok(false);
            };
            let mut tags = tx.open_table(TAGS)?;
            let mut doomed = Vec::new();
            let range = repo_range(repo);
            for item in tags.range(range.start.as_str()..range.end.as_str())? {
                let (k, v) = item?;
                if dec::<TagRecord>(v.value())?.digest == *digest {
                    doomed.push(k.value().to_owned());
                }
            }
            for k in doomed {
                tags.remove(k.as_str())?;
            }
            if let Some(subject) = rec.subject {
                tx.open_multimap_table(REFERRERS)?
                    .remove(key(repo, &subject.to_string()).as_str(), d.as_str())?;
            }
            Ok(true)
        })
    }

    /// Manifests of `repo` whose subject is `subject`.
    pub(crate) fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<Vec<(Digest, ManifestRecord)>> {
        let tx = self.db.begin_read()?;
        let manifests = tx.open_table(MANIFESTS)?;
        let mut out = Vec::new();
        for item in tx
            .open_multimap_table(REFERRERS)?
            .get(key(repo, &subject.to_string()).as_str())?
        {
            let d = item?.value().to_owned();
            if let Some(v) = manifests.get(key(repo, &d).as_str())? {
                out.push((parse_digest(&d)?, dec(v.value())?));
            }
        }
        Ok(out)
    }

    /// Digests a manifest references, as recorded when it was pushed.
    pub(crate) fn references(&self, manifest: &Digest) -> Result<Vec<Digest>> {
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        for item in tx
            .open_multimap_table(REFS)?
            .get(manifest.to_string().as_str())?
        {
            out.push(parse_digest(item?.value())?);
        }
        Ok(out)
    }
}
