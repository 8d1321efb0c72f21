//! Upload sessions (POST, PATCH, PUT). Each session is a file `uploads/<id>` whose length is
//! the offset, and an index record, so sessions survive a restart. A running hash is kept in
//! memory while the process lives; after a restart the file is hashed once at completion.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use kache_oci::{Algorithm, Digest, Hasher, RepoName};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::error::{Result, StoreError};
use crate::fs::{self, IO_BUF, Layout};
use crate::index::{Index, UploadRecord, now};
use crate::{Store, blocking};

/// Where an upload stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadStatus {
    pub id: Uuid,
    /// Bytes received so far.
    pub offset: u64,
}

#[derive(Debug)]
struct Live {
    /// sha256 of the file's bytes, when known (lost on restart or after a failed write).
    hasher: Option<Hasher>,
    len: u64,
    finished: bool,
}

/// Per-upload locks: one PATCH or PUT at a time per session.
#[derive(Debug, Default)]
pub(crate) struct Uploads {
    live: std::sync::Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<Live>>>>,
}

/// Removes upload files without a record and records without a file.
pub(crate) fn recover(layout: &Layout, index: &Index) -> Result<usize> {
    let records: HashMap<String, UploadRecord> = index.uploads()?.into_iter().collect();
    let mut removed = 0;
    for e in std::fs::read_dir(layout.uploads())? {
        let e = e?;
        if !records.contains_key(e.file_name().to_string_lossy().as_ref()) {
            std::fs::remove_file(e.path())?;
            removed += 1;
        }
    }
    for id in records.keys() {
        let exists = id.parse::<Uuid>().is_ok_and(|u| layout.upload(&u).exists());
        if !exists {
            index.remove_upload(id)?;
            removed += 1;
        }
    }
    Ok(removed)
}

impl Store {
    /// Opens a new upload session in `repo`.
    pub async fn start_upload(&self, repo: &RepoName) -> Result<UploadStatus> {
        let id = Uuid::new_v4();
        tokio::fs::File::create(self.layout.upload(&id)).await?;
        let rec = UploadRecord {
            repo: repo.as_str().to_owned(),
            started: now(),
            updated: now(),
        };
        let index = self.index.clone();
        blocking(move || index.put_upload(&id.to_string(), &rec)).await?;
        self.uploads.live.lock().expect("uploads poisoned").insert(
            id,
            Arc::new(tokio::sync::Mutex::new(Live {
                hasher: Some(Algorithm::Sha256.hasher()),
                len: 0,
                finished: false,
            })),
        );
        Ok(UploadStatus { id, offset: 0 })
    }

    /// The session's lock, after checking it exists and belongs to `repo`.
    async fn session(&self, repo: &RepoName, id: &Uuid) -> Result<Arc<tokio::sync::Mutex<Live>>> {
        let rec = self
            .index
            .upload(&id.to_string())?
            .ok_or(StoreError::UploadUnknown)?;
        if rec.repo != repo.as_str() {
            return Err(StoreError::UploadUnknown);
        }
        if let Some(l) = self.uploads.live.lock().expect("uploads poisoned").get(id) {
            return Ok(l.clone());
        }
        // First touch since a restart: the file's length is the offset.
        let len = tokio::fs::metadata(self.layout.upload(id))
            .await
            .map_err(|_| StoreError::UploadUnknown)?
            .len();
        let mut live = self.uploads.live.lock().expect("uploads poisoned");
        Ok(live
            .entry(*id)
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(Live {
                    hasher: None,
                    len,
                    finished: false,
                }))
            })
            .clone())
    }

    /// The session's lock, held, once the session is known to be open and, when the client
    /// says where its bytes start (`Content-Range`), to continue exactly where the upload is:
    /// anything else is refused before a byte is written, and the session stays as it was.
    async fn open_session(
        &self,
        repo: &RepoName,
        id: &Uuid,
        start: Option<u64>,
    ) -> Result<tokio::sync::OwnedMutexGuard<Live>> {
        let live = self.session(repo, id).await?.lock_owned().await;
        if live.finished {
            return Err(StoreError::UploadUnknown);
        }
        if let Some(start) = start
            && start != live.len
        {
            return Err(StoreError::RangeInvalid {
                expected: live.len,
                got: start,
            });
        }
        Ok(live)
    }

    /// The offset of an upload.
    pub async fn upload_status(&self, repo: &RepoName, id: &Uuid) -> Result<UploadStatus> {
        let live = self.open_session(repo, id, None).await?;
        Ok(UploadStatus {
            id: *id,
            offset: live.len,
        })
    }

    /// Appends a chunk. `start`, from `Content-Range`, must equal the current offset.
    pub async fn append_upload<S, E>(
        &self,
        repo: &RepoName,
        id: &Uuid,
        start: Option<u64>,
        body: S,
    ) -> Result<UploadStatus>
    where
        S: Stream<Item = std::result::Result<Bytes, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut live = self.open_session(repo, id, start).await?;
        let res = self.append_locked(id, &mut live, body).await;
        if res.is_err() {
            // The file may hold part of a chunk the hash has not seen: trust the file.
            live.hasher = None;
            live.len = tokio::fs::metadata(self.layout.upload(id))
                .await
                .map(|m| m.len())
                .unwrap_or(live.len);
        }
        let status = UploadStatus {
            id: *id,
            offset: live.len,
        };
        res.map(|()| status)
    }

    async fn append_locked<S, E>(&self, id: &Uuid, live: &mut Live, body: S) -> Result<()>
    where
        S: Stream<Item = std::result::Result<Bytes, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let file = tokio::fs::OpenOptions::new()
            .append(true)
            .open(self.layout.upload(id))
            .await?;
        let mut file = tokio::io::BufWriter::with_capacity(IO_BUF, file);
        let mut body = std::pin::pin!(body);
        let mut wrote = false;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    file.flush().await?;
                    return Err(StoreError::Body(std::io::Error::other(e)));
                }
            };
            file.write_all(&chunk).await?;
            if let Some(h) = live.hasher.as_mut() {
                h.update(&chunk);
            }
            live.len += chunk.len() as u64;
            wrote = true;
        }
        file.flush().await?;
        if wrote {
            let index = self.index.clone();
            let key = id.to_string();
            blocking(move || {
                if let Some(mut rec) = index.upload(&key)? {
                    rec.updated = now();
                    index.put_upload(&key, &rec)?;
                }
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    /// Completes an upload with an optional last chunk: verifies `digest`, installs the blob
    /// and links it into `repo`. A wrong digest ends the session and keeps nothing. `start`, from
    /// `Content-Range`, must equal the current offset, as for a chunk: a last chunk out of order
    /// is refused and the session kept.
    pub async fn complete_upload<S, E>(
        &self,
        repo: &RepoName,
        id: &Uuid,
        start: Option<u64>,
        digest: &Digest,
        body: S,
    ) -> Result<u64>
    where
        S: Stream<Item = std::result::Result<Bytes, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut live = self.open_session(repo, id, start).await?;
        if let Err(e) = self.append_locked(id, &mut live, body).await {
            live.hasher = None;
            return Err(e);
        }
        let path = self.layout.upload(id);
        let (actual, size) = match live.hasher.take() {
            Some(h) if digest.algorithm() == Algorithm::Sha256 => (h.finish(), live.len),
            _ => {
                let (p, alg) = (path.clone(), digest.algorithm());
                blocking(move || Ok(fs::hash_file(&p, alg)?)).await?
            }
        };
        live.finished = true;
        self.uploads
            .live
            .lock()
            .expect("uploads poisoned")
            .remove(id);
        let (index, layout, key) = (self.index.clone(), self.layout.clone(), id.to_string());
        if actual != *digest {
            blocking(move || {
                index.remove_upload(&key)?;
                let _ = std::fs::remove_file(&path);
                Ok(())
            })
            .await?;
            return Err(StoreError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        let _hold = self.gate.write(&actual).await;
        let (repo, d) = (repo.clone(), actual.clone());
        let new = blocking(move || {
            std::fs::File::open(&path)?.sync_all()?;
            fs::install(&layout, &path, &d)?;
            index.complete_upload(&key, &repo, &d, size)
        })
        .await?;
        self.added(new, size);
        Ok(size)
    }

    /// Abandons an upload and removes its bytes.
    pub async fn cancel_upload(&self, repo: &RepoName, id: &Uuid) -> Result<()> {
        let mut live = self.open_session(repo, id, None).await?;
        live.finished = true;
        self.uploads
            .live
            .lock()
            .expect("uploads poisoned")
            .remove(id);
        let (index, path, key) = (self.index.clone(), self.layout.upload(id), id.to_string());
        blocking(move || {
            index.remove_upload(&key)?;
            let _ = std::fs::remove_file(&path);
            Ok(())
        })
        .await
    }

    /// Removes sessions untouched for `max_age`, skipping any that a request holds right now.
    pub async fn expire_uploads(&self, max_age: std::time::Duration) -> Result<usize> {
        let cutoff = now().saturating_sub(max_age.as_secs());
        let mut expired = 0;
        for (key, rec) in self.index.uploads()? {
            if rec.updated >= cutoff {
                continue;
            }
            let Ok(id) = key.parse::<Uuid>() else {
                continue;
            };
            let live = self
                .uploads
                .live
                .lock()
                .expect("uploads poisoned")
                .get(&id)
                .cloned();
            let guard = match &live {
                Some(l) => match l.try_lock() {
                    Ok(g) => Some(g),
                    Err(_) => continue,
                },
                None => None,
            };
            if let Some(mut g) = guard {
                g.finished = true;
            }
            self.uploads
                .live
                .lock()
                .expect("uploads poisoned")
                .remove(&id);
            let (index, path) = (self.index.clone(), self.layout.upload(&id));
            blocking(move || {
                index.remove_upload(&key)?;
                let _ = std::fs::remove_file(&path);
                Ok(())
            })
            .await?;
            expired += 1;
        }
        Ok(expired)
    }
}
