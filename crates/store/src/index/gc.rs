//! What garbage collection reads from the index and how it changes it. A collection reads one
//! snapshot ([`View`]) into compact tables of numbers (a store of 100,000 blobs fits in a few
//! MiB), then removes what it decided in small write transactions ([`Index::sweep`],
//! [`Index::evict`]).

use std::collections::HashMap;

use kache_oci::{Algorithm, Digest, RepoName};
use redb::{
    ReadTransaction, ReadableDatabase, ReadableMultimapTable, ReadableTable, ReadableTableMetadata,
};

use super::{
    ACCESS, BLOBS, BlobRecord, Index, KEPT, LINKS, MANIFESTS, ManifestRecord, REFERRERS, REFS,
    SCOPED, TAGS, TagRecord, dec, key, parse_digest,
};
use crate::error::{Result, StoreError};
use crate::gc::Pace;

/// A blob, by its position in [`View::blobs`].
pub(crate) type BlobId = u32;
/// A repository, by its position in [`View::repos`].
pub(crate) type RepoId = u32;

/// A digest as a collection holds it: inline, without an allocation of its own (a store of
/// 100,000 blobs is one vector of a few MiB, not 100,000 strings), ordered as the index orders
/// digests (by algorithm, then by hex, which is the order of the bytes).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key {
    algorithm: Algorithm,
    bytes: [u8; 64],
}

impl Key {
    pub(crate) fn of(d: &Digest) -> Key {
        let mut bytes = [0u8; 64];
        // A Digest's hex is validated: lowercase, of its algorithm's length (32 or 64 bytes).
        let _ = hex::decode_to_slice(d.hex(), &mut bytes[..d.hex().len() / 2]);
        Key {
            algorithm: d.algorithm(),
            bytes,
        }
    }

    pub(crate) fn digest(&self) -> Digest {
        let len = match self.algorithm {
            Algorithm::Sha256 => 32,
            Algorithm::Sha512 => 64,
        };
        format!(
            "{}:{}",
            self.algorithm.as_str(),
            hex::encode(&self.bytes[..len])
        )
        .parse()
        .expect("a key holds a valid digest")
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.digest())
    }
}

/// A blob as the collection sees it.
#[derive(Debug)]
pub(crate) struct BlobInfo {
    pub key: Key,
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
    /// Sorted by digest (the order of the index's keys), so a digest is found by a binary
    /// search rather than a second copy of every digest in a map.
    pub blobs: Vec<BlobInfo>,
    pub repos: Vec<RepoName>,
    repo_ids: HashMap<String, RepoId>,
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
    pub size: u64,
    /// Its records in the links table (whole keys: a repository where it was only uploaded,
    /// holding no manifest or tag, is not in the view).
    pub links: Vec<String>,
    /// Repositories holding it as a manifest, with that manifest's subject.
    pub manifests: Vec<(RepoId, Option<Digest>)>,
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
    fn repo_id(&mut self, name: &str) -> Result<RepoId> {
        if let Some(id) = self.repo_ids.get(name) {
            return Ok(*id);
        }
        let repo: RepoName = name
            .parse()
            .map_err(|e| StoreError::Index(format!("corrupt repository name in index: {e}")))?;
        let id = self.repos.len() as RepoId;
        self.repos.push(repo);
        self.repo_ids.insert(name.to_owned(), id);
        Ok(id)
    }

    fn blob_id(&self, s: &str) -> Result<Option<BlobId>> {
        Ok(self.id_of(&parse_digest(s)?))
    }

    pub(crate) fn id_of(&self, d: &Digest) -> Option<BlobId> {
        let key = Key::of(d);
        self.blobs
            .binary_search_by(|b| b.key.cmp(&key))
            .ok()
            .map(|i| i as BlobId)
    }
}

fn split(k: &str) -> Result<(&str, &str)> {
    k.split_once('\0')
        .ok_or_else(|| StoreError::Index(format!("corrupt index key {k:?}")))
}

impl Index {
    /// Reads a [`View`] from one read transaction, which the caller keeps for [`Index::doomed`].
    pub(crate) fn gc_view(&self, pace: &mut Pace) -> Result<(View, ReadTransaction)> {
        let tx = self.db.begin_read()?;
        let mut v = View::default();
        {
            let blobs = tx.open_table(BLOBS)?;
            v.blobs.reserve(blobs.len()? as usize);
            for item in blobs.iter()? {
                pace.tick();
                let (k, val) = item?;
                let digest = parse_digest(k.value())?;
                let rec: BlobRecord = dec(val.value())?;
                v.blobs.push(BlobInfo {
                    key: Key::of(&digest),
                    size: rec.size,
                    created: rec.created,
                    access: 0,
                });
            }
        }
        // Keys come sorted as strings; `sha256:` sorts before `sha512:` and the hex parts have
        // one length per algorithm, so that is the digests' own order. Checked, not assumed.
        if !v.blobs.is_sorted_by(|a, b| a.key < b.key) {
            v.blobs.sort_unstable_by_key(|b| b.key);
        }
        for item in tx.open_table(ACCESS)?.iter()? {
            pace.tick();
            let (k, at) = item?;
            if let Some(id) = v.blob_id(k.value())? {
                v.blobs[id as usize].access = at.value();
            }
        }
        for item in tx.open_table(MANIFESTS)?.iter()? {
            pace.tick();
            let (k, val) = item?;
            let (repo, digest) = split(k.value())?;
            let Some(blob) = v.blob_id(digest)? else {
                continue;
            };
            let rec: ManifestRecord = dec(val.value())?;
            let repo = v.repo_id(repo)?;
            v.manifests.insert(
                (repo, blob),
                ManifestInfo {
                    created: rec.created,
                    subject: rec.subject,
                },
            );
        }
        for item in tx.open_multimap_table(REFS)?.iter()? {
            pace.tick();
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
            pace.tick();
            let (k, values) = item?;
            let (repo, subject) = split(k.value())?;
            let Some(subject) = v.blob_id(subject)? else {
                continue;
            };
            let repo = v.repo_id(repo)?;
            let mut from = Vec::new();
            for r in values {
                if let Some(id) = v.blob_id(r?.value())? {
                    from.push(id);
                }
            }
            v.referrers.insert((repo, subject), from);
        }
        for item in tx.open_table(TAGS)?.iter()? {
            pace.tick();
            let (k, val) = item?;
            let (repo, tag) = split(k.value())?;
            let rec: TagRecord = dec(val.value())?;
            let Some(manifest) = v.id_of(&rec.digest) else {
                continue;
            };
            let repo = v.repo_id(repo)?;
            v.tags.push(TagInfo {
                repo,
                tag: tag.to_owned(),
                manifest,
                updated: rec.updated,
            });
        }
        for item in tx.open_table(KEPT)?.iter()? {
            pace.tick();
            let (k, pinned) = item?;
            let (repo, reference) = split(k.value())?;
            let repo = v.repo_id(repo)?;
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
        pace: &mut Pace,
    ) -> Result<Vec<Doomed>> {
        let mut out: HashMap<BlobId, Doomed> = blobs
            .iter()
            .map(|&b| {
                let info = &view.blobs[b as usize];
                let d = Doomed {
                    digest: info.key.digest(),
                    size: info.size,
                    links: Vec::new(),
                    manifests: Vec::new(),
                };
                (b, d)
            })
            .collect();
        for item in tx.open_table(LINKS)?.iter()? {
            pace.tick();
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
                d.manifests.push((repo, m.subject.clone()));
            }
        }
        let mut order: Vec<BlobId> = blobs.to_vec();
        order.sort_unstable();
        Ok(order.into_iter().filter_map(|b| out.remove(&b)).collect())
    }

    /// Removes a batch of blobs with every record naming them, in one transaction. `repos`
    /// names the repository ids of the view they were decided from.
    pub(crate) fn sweep(&self, batch: &[&Doomed], repos: &[RepoName]) -> Result<()> {
        self.write(|tx| {
            let mut blobs = tx.open_table(BLOBS)?;
            let mut links = tx.open_table(LINKS)?;
            let mut manifests = tx.open_table(MANIFESTS)?;
            let mut refs = tx.open_multimap_table(REFS)?;
            let mut referrers = tx.open_multimap_table(REFERRERS)?;
            let mut access = tx.open_table(ACCESS)?;
            let mut scoped = tx.open_table(SCOPED)?;
            for d in batch {
                let digest = d.digest.to_string();
                blobs.remove(digest.as_str())?;
                scoped.remove(digest.as_str())?;
                for link in &d.links {
                    links.remove(link.as_str())?;
                }
                for (r, subject) in &d.manifests {
                    let repo = repos[*r as usize].as_str();
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
