//! The filesystem half of the store: where files live and how a blob reaches its final path
//! (hash while writing into `tmp/`, verify, fsync, rename, fsync the directory).

use std::path::{Path, PathBuf};

use kache_oci::{Algorithm, Digest, Hasher};
use tokio::io::AsyncWriteExt;

use crate::error::{Result, StoreError};

/// Reads and writes of 256 KiB: large enough that syscalls and task hops stay off the profile.
pub(crate) const IO_BUF: usize = 256 * 1024;

/// The directory layout under `--data-dir`: every path the store uses is built here.
///
/// ```text
/// blobs/<alg>/<first two hex>/<hex>   every blob and manifest, named by its digest
/// tmp/<uuid>                          writes in progress (removed at open: they never finished)
/// uploads/<uuid>                      upload sessions; the file's length is the offset
/// index.redb                          the index (index.rs lists its tables)
/// ```
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    root: PathBuf,
}

impl Layout {
    pub(crate) fn new(root: &Path) -> Self {
        Layout {
            root: root.to_owned(),
        }
    }

    pub(crate) fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }

    /// `blobs/<alg>/<first two hex>/<hex>`: a `Digest` is validated hex, so this never escapes.
    pub(crate) fn blob(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.blobs()
            .join(d.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    pub(crate) fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub(crate) fn uploads(&self) -> PathBuf {
        self.root.join("uploads")
    }

    pub(crate) fn upload(&self, id: &uuid::Uuid) -> PathBuf {
        self.uploads().join(id.to_string())
    }

    pub(crate) fn index(&self) -> PathBuf {
        self.root.join("index.redb")
    }
}

/// Makes a rename or a new entry in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Moves a complete, fsynced file to the final path of `digest`. Returns false when the blob
/// was already there (the new copy is then dropped: same digest, same bytes).
pub(crate) fn install(layout: &Layout, from: &Path, digest: &Digest) -> std::io::Result<bool> {
    let to = layout.blob(digest);
    if to.exists() {
        std::fs::remove_file(from)?;
        return Ok(false);
    }
    let dir = to.parent().expect("blob paths have a parent");
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        sync_dir(dir.parent().expect("shard directories have a parent"))?;
    }
    std::fs::rename(from, &to)?;
    sync_dir(dir)?;
    Ok(true)
}

/// Hashes a whole file, for uploads whose running hash was lost (a restart) or is of another
/// algorithm than the digest the client finally names.
pub(crate) fn hash_file(path: &Path, algorithm: Algorithm) -> std::io::Result<(Digest, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = algorithm.hasher();
    let mut buf = vec![0u8; IO_BUF];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((h.finish(), len));
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
}

/// A blob being written to a temporary file. Dropped unfinished, it removes its file: a failed
/// or abandoned write leaves nothing behind.
#[derive(Debug)]
pub struct BlobWriter {
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    path: PathBuf,
    hasher: Option<Hasher>,
    len: u64,
    limit: Option<u64>,
}

impl BlobWriter {
    pub(crate) async fn create(
        path: PathBuf,
        algorithm: Algorithm,
        limit: Option<u64>,
    ) -> Result<Self> {
        let file = tokio::fs::File::create(&path).await?;
        Ok(BlobWriter {
            file: Some(tokio::io::BufWriter::with_capacity(IO_BUF, file)),
            path,
            hasher: Some(algorithm.hasher()),
            len: 0,
            limit,
        })
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `chunk`, hashing it on the way.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.len += chunk.len() as u64;
        if let Some(limit) = self.limit
            && self.len > limit
        {
            return Err(StoreError::TooLarge { limit });
        }
        if let Some(h) = self.hasher.as_mut() {
            h.update(chunk);
        }
        let file = self.file.as_mut().expect("writer used after finish");
        file.write_all(chunk).await?;
        Ok(())
    }

    /// Flushes and fsyncs; returns the digest of everything written.
    pub(crate) async fn finish(mut self) -> Result<(PathBuf, Digest, u64)> {
        let mut file = self.file.take().expect("writer finished twice");
        file.flush().await?;
        file.get_mut().sync_all().await?;
        drop(file);
        let digest = self.hasher.take().expect("hasher present").finish();
        let path = std::mem::take(&mut self.path);
        Ok((path, digest, self.len))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
