//! Who may read a cached repository: its visibility and its grants, and the blobs that entered
//! through a private repository, which no other repository links without fetching them itself.

use kache_oci::RepoName;
use kache_wire::{Grant, Visibility};
use redb::{ReadableDatabase, ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{
    GRANTS, Index, LINKS, MANIFESTS, SCOPED, VISIBILITY, dec, enc, key, now, repo_range, suffix,
};
use crate::error::Result;

#[derive(Debug, Serialize, Deserialize)]
struct VisibilityRecord {
    visibility: Visibility,
    /// When the upstream last said so (unix seconds).
    at: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct GrantRecord {
    verified_at: u64,
    expires_at: u64,
}

/// Whether `repo` is private, inside a write.
pub(super) fn is_private(tx: &WriteTransaction, repo: &RepoName) -> Result<bool> {
    Ok(match tx.open_table(VISIBILITY)?.get(repo.as_str())? {
        Some(v) => dec::<VisibilityRecord>(v.value())?.visibility == Visibility::Private,
        None => false,
    })
}

/// After `digest` was linked into `repo` by a write that holds its bytes (a push, a fetch):
/// linked into a private repository, it is scoped to the repositories that link it; anywhere
/// else, its bytes were just shown to be everyone's, and it is not.
pub(super) fn note_link(tx: &WriteTransaction, repo: &RepoName, digest: &str) -> Result<()> {
    let mut scoped = tx.open_table(SCOPED)?;
    if is_private(tx, repo)? {
        scoped.insert(digest, now())?;
    } else {
        scoped.remove(digest)?;
    }
    Ok(())
}

/// Whether `digest` may be linked into another repository without its bytes (a mount that
/// names no source).
pub(super) fn is_scoped(tx: &redb::ReadTransaction, digest: &str) -> Result<bool> {
    Ok(tx.open_table(SCOPED)?.get(digest)?.is_some())
}

impl Index {
    pub(crate) fn visibility(&self, repo: &RepoName) -> Result<Option<Visibility>> {
        let tx = self.db.begin_read()?;
        match tx.open_table(VISIBILITY)?.get(repo.as_str())? {
            Some(v) => Ok(Some(dec::<VisibilityRecord>(v.value())?.visibility)),
            None => Ok(None),
        }
    }

    /// Sets what `repo` is. Made private, every blob and manifest it holds is scoped, in the
    /// same transaction.
    pub(crate) fn set_visibility(&self, repo: &RepoName, visibility: Visibility) -> Result<()> {
        self.write(|tx| {
            tx.open_table(VISIBILITY)?.insert(
                repo.as_str(),
                enc(&VisibilityRecord {
                    visibility,
                    at: now(),
                })
                .as_slice(),
            )?;
            if visibility == Visibility::Private {
                let links = tx.open_table(LINKS)?;
                let mut scoped = tx.open_table(SCOPED)?;
                let manifests = tx.open_table(MANIFESTS)?;
                let range = repo_range(repo);
                let range = range.start.as_str()..range.end.as_str();
                for item in links.range(range.clone())? {
                    scoped.insert(suffix(item?.0.value()), now())?;
                }
                for item in manifests.range(range)? {
                    scoped.insert(suffix(item?.0.value()), now())?;
                }
            }
            Ok(())
        })
    }

    pub(crate) fn grant(&self, repo: &RepoName, namespace: &str) -> Result<Option<Grant>> {
        let tx = self.db.begin_read()?;
        match tx.open_table(GRANTS)?.get(key(repo, namespace).as_str())? {
            Some(v) => {
                let r: GrantRecord = dec(v.value())?;
                Ok(Some(Grant {
                    repository: repo.to_string(),
                    namespace: namespace.to_owned(),
                    verified_at: r.verified_at,
                    expires_at: r.expires_at,
                }))
            }
            None => Ok(None),
        }
    }

    /// Writes a grant, durably: once this returns, a crash does not lose it.
    pub(crate) fn put_grant(&self, repo: &RepoName, grant: &Grant) -> Result<()> {
        self.write(|tx| {
            tx.open_table(GRANTS)?.insert(
                key(repo, &grant.namespace).as_str(),
                enc(&GrantRecord {
                    verified_at: grant.verified_at,
                    expires_at: grant.expires_at,
                })
                .as_slice(),
            )?;
            Ok(())
        })
    }

    pub(crate) fn remove_grant(&self, repo: &RepoName, namespace: &str) -> Result<bool> {
        self.write(|tx| {
            Ok(tx
                .open_table(GRANTS)?
                .remove(key(repo, namespace).as_str())?
                .is_some())
        })
    }

    /// Every grant, by repository then namespace.
    pub(crate) fn grants(&self) -> Result<Vec<Grant>> {
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        for item in tx.open_table(GRANTS)?.iter()? {
            let (k, v) = item?;
            let (repo, namespace) = k.value().split_once('\0').unwrap_or((k.value(), ""));
            let r: GrantRecord = dec(v.value())?;
            out.push(Grant {
                repository: repo.to_owned(),
                namespace: namespace.to_owned(),
                verified_at: r.verified_at,
                expires_at: r.expires_at,
            });
        }
        Ok(out)
    }
}
