//! What garbage collection reads from the index and how it changes it. A collection reads one
//! snapshot ([`View`]) into compact tables of numbers (a store of 100,000 blobs fits in a few
//! MiB), then removes what it decided in small write transactions ([`Index::sweep`],
//! [`Index::evict`]).

use std::collections::HashMap;

use kache_oci::{Digest, RepoName};
use redb::{
    ReadTransaction, ReadableDatabase, ReadableMultimapTable, ReadableTable, ReadableTableMetadata,
};

use super::{
    ACCESS, BLOBS, BlobRecord, Index, KEPT, LINKS, MANIFESTS, ManifestRecord, REFERRERS, REFS,
    TAGS, TagRecord, dec, key, parse_digest,
};
use crate::error::{Result, StoreError};

/// A blob, by its position in [`View::blobs`].
pub(crate) type BlobId = u32;
/// A repository, by its position in [`View::repos`].
pub(crate) type RepoId = u32;

/// A blob as the collection sees it.
#[derive(Debug)]
pub(crate) struct BlobInfo {
    pub digest: Digest,
    pub size: u64,
    pub created: u64,
    /// Last served, as far as flushed (0: never).
    pub access: u64,
}

/// A manifest of one repository.
#[derive(Debug, Clone)]
pub(crate) struct ManifestInfo {
    pub created: u64,
    /// The manifest it refers to (OCI `subject`): the key of its referrers entry.
    pub subject: Option<Digest>,
}

/// A tag, a root of the mark.
#[derive(Debug)]
pub(crate) struct TagInfo {
    pub repo: RepoId,
    pub tag: String,
    pub manifest: BlobId,
    pub updated: u64,
}

/// An image the cluster keeps (a CachedImage), as the controller last reported it.
#[derive(Debug)]
pub(crate) struct KeptInfo {
    pub repo: RepoId,
    pub reference: KeptRef,
    pub pinned: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeptRef {
    Tag(String),
    /// A manifest the store holds in that repository.
    Digest(BlobId),
    /// A digest the store does not hold (yet): nothing to mark or evict.
    Absent,
}

/// One snapshot of everything a collection decides from.
#[derive(Debug, Default)]
pub(crate) struct View {
    pub blobs: Vec<BlobInfo>,
    pub by_digest: HashMap<Digest, BlobId>,
    pub repos: Vec<RepoName>,
    pub manifests: HashMap<(RepoId, BlobId), ManifestInfo>,
    /// What each manifest references (config, layers, child manifests), among blobs held.
    pub refs: HashMap<BlobId, Vec<BlobId>>,
    /// `(repo, subject)` → manifests of `repo` whose subject it is.
    pub referrers: HashMap<(RepoId, BlobId), Vec<BlobId>>,
    pub tags: Vec<TagInfo>,
    pub kept: Vec<KeptInfo>,
}

/// What to remove for one blob, in one transaction with the others of its batch.
#[derive(Debug)]
pub(crate) struct Doomed {
    pub digest: Digest,
    /// Keys of `LINKS` naming it.
    pub links: Vec<String>,
    /// Repositories holding it as a manifest, with that manifest's subject.
    pub manifests: Vec<(String, Option<Digest>)>,
}

/// An image to evict: a tag (removed only if it still points where the plan saw it) or an
/// entry of the kept list.
#[derive(Debug, Clone)]
pub(crate) enum Eviction {
    Tag {
        repo: RepoName,
        tag: String,
        digest: Digest,
    },
    Kept {
        repo: RepoName,
        reference: String,
    },
}

impl View {
    fn repo_id(&mut self, ids: &mut HashMap<String, RepoId>, name: &str) -> Result<RepoId> {
        if let Some(id) = ids.get(name) {
            return Ok(*id);
        }
        let repo: RepoName = name
            .parse()
            .map_err(|e| StoreError::Index(format!("corrupt repository name in index: {e}")))?;
        let id = self.repos.len() as RepoId;
        self.repos.push(repo);
        ids.insert(name.to_owned(), id);
        Ok(id)
    }

    fn blob_id(&self, s: &str) -> Result<Option<BlobId>> {
        Ok(self.by_digest.get(&parse_digest(s)?).copied())
    }
}

fn split(k: &str) -> Result<(&str, &str)> {
    k.split_once('\0')
        .ok_or_else(|| StoreError::Index(format!("corrupt index key {k:?}")))
}

impl Index {
    /// Reads a [`View`] from one read transaction, which the caller keeps for [`Index::doomed`].
    pub(crate) fn gc_view(&self) -> Result<(View, ReadTransaction)> {
        let tx = self.db.begin_read()?;
        let mut v = View::default();
        let mut repo_ids = HashMap::new();
        {
            let blobs = tx.open_table(BLOBS)?;
            v.blobs.reserve(blobs.len()? as usize);
            for item in blobs.iter()? {
                let (k, val) = item?;
                let digest = parse_digest(k.value())?;
                let rec: BlobRecord = dec(val.value())?;
                v.by_digest.insert(digest.clone(), v.blobs.len() as BlobId);
                v.blobs.push(BlobInfo {
                    digest,
                    size: rec.size,
                    created: rec.created,
                    access: 0,
                });
            }
        }
        for item in tx.open_table(ACCESS)?.iter()? {
            let (k, at) = item?;
            if let Some(id) = v.blob_id(k.value())? {
                v.blobs[id as usize].access = at.value();
            }
        }
        for item in tx.open_table(MANIFESTS)?.iter()? {
            let (k, val) = item?;
            let (repo, digest) = split(k.value())?;
            let Some(blob) = v.blob_id(digest)? else {
                continue;
            };
            let rec: ManifestRecord = dec(val.value())?;
            let repo = v.repo_id(&mut repo_ids, repo)?;
            v.manifests.insert(
                (repo, blob),
                ManifestInfo {
                    created: rec.created,
                    subject: rec.subject,
                },
            );
        }
        for item in tx.open_multimap_table(REFS)?.iter()? {
            let (k, values) = item?;
            let Some(from) = v.blob_id(k.value())? else {
                continue;
            };
            let mut to = Vec::new();
            for r in values {
                if let Some(id) = v.blob_id(r?.value())? {
                    to.push(id);
                }
            }
            v.refs.insert(from, to);
        }
        for item in tx.open_multimap_table(REFERRERS)?.iter()? {
            let (k, values) = item?;
            let (repo, subject) = split(k.value())?;
            let Some(subject) = v.blob_id(subject)? else {
                continue;
            };
            let repo = v.repo_id(&mut repo_ids, repo)?;
            let mut from = Vec::new();
            for r in values {
                if let Some(id) = v.blob_id(r?.value())? {
                    from.push(id);
                }
            }
            v.referrers.insert((repo, subject), from);
        }
        for item in tx.open_table(TAGS)?.iter()? {
            let (k, val) = item?;
            let (repo, tag) = split(k.value())?;
            let rec: TagRecord = dec(val.value())?;
            let Some(&manifest) = v.by_digest.get(&rec.digest) else {
                continue;
            };
            let repo = v.repo_id(&mut repo_ids, repo)?;
            v.tags.push(TagInfo {
                repo,
                tag: tag.to_owned(),
                manifest,
                updated: rec.updated,
            });
        }
        for item in tx.open_table(KEPT)?.iter()? {
            let (k, pinned) = item?;
            let (repo, reference) = split(k.value())?;
            let repo = v.repo_id(&mut repo_ids, repo)?;
            let reference = if reference.contains(':') {
                match v.blob_id(reference)? {
                    Some(id) => KeptRef::Digest(id),
                    None => KeptRef::Absent,
                }
            } else {
                KeptRef::Tag(reference.to_owned())
            };
            v.kept.push(KeptInfo {
                repo,
                reference,
                pinned: pinned.value() != 0,
            });
        }
        Ok((v, tx))
    }

    /// What removing each of `blobs` takes, read from the collection's snapshot. Anything
    /// linked or written since would have held the digest (gate.rs), so the snapshot is enough.
    pub(crate) fn doomed(
        tx: &ReadTransaction,
        view: &View,
        blobs: &[BlobId],
    ) -> Result<Vec<Doomed>> {
        let mut out: HashMap<BlobId, Doomed> = blobs
            .iter()
            .map(|&b| {
                let d = Doomed {
                    digest: view.blobs[b as usize].digest.clone(),
                    links: Vec::new(),
                    manifests: Vec::new(),
                };
                (b, d)
            })
            .collect();
        for item in tx.open_table(LINKS)?.iter()? {
            let (k, _) = item?;
            let (_, digest) = split(k.value())?;
            if let Some(id) = view.blob_id(digest)?
                && let Some(d) = out.get_mut(&id)
            {
                d.links.push(k.value().to_owned());
            }
        }
        for (&(repo, blob), m) in view.manifests.iter() {
            if let Some(d) = out.get_mut(&blob) {
                let repo = view.repos[repo as usize].as_str().to_owned();
                d.manifests.push((repo, m.subject.clone()));
            }
        }
        let mut order: Vec<BlobId> = blobs.to_vec();
        order.sort_unstable();
        Ok(order.into_iter().filter_map(|b| out.remove(&b)).collect())
    }

    /// Removes a batch of blobs with every record naming them, in one transaction.
    pub(crate) fn sweep(&self, batch: &[&Doomed]) -> Result<()> {
        self.write(|tx| {
            let mut blobs = tx.open_table(BLOBS)?;
            let mut links = tx.open_table(LINKS)?;
            let mut manifests = tx.open_table(MANIFESTS)?;
            let mut refs = tx.open_multimap_table(REFS)?;
            let mut referrers = tx.open_multimap_table(REFERRERS)?;
            let mut access = tx.open_table(ACCESS)?;
            for d in batch {
                let digest = d.digest.to_string();
                blobs.remove(digest.as_str())?;
                for k in &d.links {
                    links.remove(k.as_str())?;
                }
                for (repo, subject) in &d.manifests {
                    manifests.remove(format!("{repo}\0{digest}").as_str())?;
                    if let Some(s) = subject {
                        referrers.remove(format!("{repo}\0{s}").as_str(), digest.as_str())?;
                    }
                }
                refs.remove_all(digest.as_str())?;
                access.remove(digest.as_str())?;
            }
            Ok(())
        })
    }

    /// Removes evicted tags (each only if it still points at the digest the plan saw) and kept
    /// entries, in one transaction. Returns how many were removed.
    pub(crate) fn evict(&self, evictions: &[Eviction]) -> Result<usize> {
        self.write(|tx| {
            let mut tags = tx.open_table(TAGS)?;
            let mut kept = tx.open_table(KEPT)?;
            let mut n = 0;
            for e in evictions {
                match e {
                    Eviction::Tag { repo, tag, digest } => {
                        let k = key(repo, tag);
                        let current: Option<TagRecord> =
                            tags.get(k.as_str())?.map(|v| dec(v.value())).transpose()?;
                        if current.is_some_and(|r| r.digest == *digest) {
                            tags.remove(k.as_str())?;
                            n += 1;
                        }
                    }
                    Eviction::Kept { repo, reference } => {
                        if kept.remove(key(repo, reference).as_str())?.is_some() {
                            n += 1;
                        }
                    }
                }
            }
            Ok(n)
        })
    }
}
