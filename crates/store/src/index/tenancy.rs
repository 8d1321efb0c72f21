//! Who may read a cached repository: its visibility and its grants, and the blobs that entered
//! through a private repository, which no other repository links without fetching them itself.

use std::collections::HashMap;
use std::sync::RwLock;

use kache_oci::RepoName;
use kache_wire::{Grant, Visibility};
use redb::{ReadableDatabase, ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{
    GRANTS, Index, LINKS, MANIFESTS, SCOPED, TAGS, VISIBILITY, dec, enc, key, now, repo_range,
    suffix,
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

/// The visibility and grant tables in memory, for the reads every request of a cached
/// repository makes. Each write holds the view's lock from before its transaction until the
/// view shows it, so the view never goes back to an older state: writes are rare (a repository
/// classified, a grant checked), reads are not.
#[derive(Debug, Default)]
pub(super) struct View {
    inner: RwLock<Tables>,
}

#[derive(Debug, Default)]
struct Tables {
    visibility: HashMap<String, Visibility>,
    /// By `repo\0namespace`, as the table keys them.
    grants: HashMap<String, GrantRecord>,
}

impl View {
    pub(super) fn load(db: &redb::Database) -> Result<View> {
        let tx = db.begin_read()?;
        let mut t = Tables::default();
        for item in tx.open_table(VISIBILITY)?.iter()? {
            let (k, v) = item?;
            let r: VisibilityRecord = dec(v.value())?;
            t.visibility.insert(k.value().to_owned(), r.visibility);
        }
        for item in tx.open_table(GRANTS)?.iter()? {
            let (k, v) = item?;
            t.grants.insert(k.value().to_owned(), dec(v.value())?);
        }
        Ok(View {
            inner: RwLock::new(t),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tables> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tables> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Index {
    pub(crate) fn visibility(&self, repo: &RepoName) -> Result<Option<Visibility>> {
        Ok(self.tenancy.read().visibility.get(repo.as_str()).copied())
    }

    /// Sets what `repo` is. Made private, every blob and manifest it holds is scoped, in the
    /// same transaction.
    pub(crate) fn set_visibility(&self, repo: &RepoName, visibility: Visibility) -> Result<()> {
        let mut view = self.tenancy.write();
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
        })?;
        view.visibility.insert(repo.to_string(), visibility);
        Ok(())
    }

    pub(crate) fn grant(&self, repo: &RepoName, namespace: &str) -> Result<Option<Grant>> {
        let view = self.tenancy.read();
        Ok(view.grants.get(&key(repo, namespace)).map(|r| Grant {
            repository: repo.to_string(),
            namespace: namespace.to_owned(),
            verified_at: r.verified_at,
            expires_at: r.expires_at,
        }))
    }

    /// Writes a grant, durably: once this returns, a crash does not lose it.
    pub(crate) fn put_grant(&self, repo: &RepoName, grant: &Grant) -> Result<()> {
        let mut view = self.tenancy.write();
        let (k, record) = (
            key(repo, &grant.namespace),
            GrantRecord {
                verified_at: grant.verified_at,
                expires_at: grant.expires_at,
            },
        );
        self.write(|tx| {
            tx.open_table(GRANTS)?
                .insert(k.as_str(), enc(&record).as_slice())?;
            Ok(())
        })?;
        view.grants.insert(k, record);
        Ok(())
    }

    pub(crate) fn remove_grant(&self, repo: &RepoName, namespace: &str) -> Result<bool> {
        let mut view = self.tenancy.write();
        let k = key(repo, namespace);
        let removed = self.write(|tx| Ok(tx.open_table(GRANTS)?.remove(k.as_str())?.is_some()))?;
        view.grants.remove(&k);
        Ok(removed)
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

    /// What a collection forgets of who may read: the visibility and grants of repositories
    /// that hold nothing any more (classified before `cutoff`, so that one being filled now is
    /// left alone), and grants that expired before `cutoff`. Returns how many repositories and
    /// grants it forgot.
    pub(crate) fn forget_tenancy(&self, cutoff: u64) -> Result<(u64, u64)> {
        let mut view = self.tenancy.write();
        let (emptied, ended) = self.write(|tx| {
            let mut visibility = tx.open_table(VISIBILITY)?;
            let mut grants = tx.open_table(GRANTS)?;
            let emptied = {
                let (links, manifests, tags) = (
                    tx.open_table(LINKS)?,
                    tx.open_table(MANIFESTS)?,
                    tx.open_table(TAGS)?,
                );
                let mut emptied = std::collections::HashSet::new();
                for item in visibility.iter()? {
                    let (k, v) = item?;
                    if dec::<VisibilityRecord>(v.value())?.at > cutoff {
                        continue;
                    }
                    let name = k.value();
                    let range = format!("{name}\0")..format!("{name}\x01");
                    let holds = any_in(&links, &range)?
                        || any_in(&manifests, &range)?
                        || any_in(&tags, &range)?;
                    if !holds {
                        emptied.insert(name.to_owned());
                    }
                }
                emptied
            };
            for name in &emptied {
                visibility.remove(name.as_str())?;
            }
            let mut ended = Vec::new();
            for item in grants.iter()? {
                let (k, v) = item?;
                let repo = k.value().split_once('\0').map_or(k.value(), |(r, _)| r);
                if emptied.contains(repo) || dec::<GrantRecord>(v.value())?.expires_at <= cutoff {
                    ended.push(k.value().to_owned());
                }
            }
            for k in &ended {
                grants.remove(k.as_str())?;
            }
            Ok((emptied, ended))
        })?;
        for name in &emptied {
            view.visibility.remove(name);
        }
        for k in &ended {
            view.grants.remove(k);
        }
        Ok((emptied.len() as u64, ended.len() as u64))
    }
}

/// Whether `table` has a key in `range`.
fn any_in<V: redb::Value + 'static>(
    table: &impl ReadableTable<&'static str, V>,
    range: &std::ops::Range<String>,
) -> Result<bool> {
    Ok(table
        .range(range.start.as_str()..range.end.as_str())?
        .next()
        .is_some())
}
