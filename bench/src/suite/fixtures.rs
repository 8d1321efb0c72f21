//! The blobs every server holds: pseudo-random files of the sizes the options ask for, and an
//! image manifest of two of them.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use super::{MIB, OCI_MANIFEST, Options};

/// A file and its size and digest.
#[derive(Debug, Clone)]
pub struct Blob {
    pub path: PathBuf,
    pub size: u64,
    pub digest: String,
}

impl Blob {
    /// The file's name, which is its path on nginx.
    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Writes `size` pseudo-random bytes (xorshift, distinct per seed) and hashes them on the way.
fn make_blob(path: &Path, size: u64, seed: u64) -> Result<Blob> {
    let mut f = std::fs::File::create(path)?;
    let mut h = Sha256::new();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        for chunk in buf.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        h.update(&buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(Blob {
        path: path.to_owned(),
        size,
        digest: format!("sha256:{}", hex::encode(h.finalize())),
    })
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Where a kache store under `data` keeps the blob `digest` (`sha256:<hex>`).
pub fn kache_blob_file(data: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    data.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// Where distribution's filesystem storage under `root` keeps the blob `digest`.
pub fn distribution_blob_file(root: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    root.join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

fn write_blob(path: &Path, bytes: &[u8]) -> Result<Blob> {
    std::fs::write(path, bytes)?;
    Ok(Blob {
        path: path.to_owned(),
        size: bytes.len() as u64,
        digest: digest_of(bytes),
    })
}

/// The blobs of the run, one for each use, and the manifest of `small` and `big`.
#[derive(Debug)]
pub struct Blobs {
    pub config: Blob,
    /// 1 MiB: the request-rate step.
    pub small: Blob,
    /// `--big-mib`: the download-throughput step.
    pub big: Blob,
    /// `--huge-mib`: the memory step (a few bytes when that step is not run).
    pub huge: Blob,
    /// `--big-mib`, only on the upstream: the single cold pull.
    pub cold: Blob,
    /// `--cold-huge-mib`, only on the upstream: the second single cold pull (a few bytes when
    /// the cold step is not run or the size is 0).
    pub cold_huge: Blob,
    /// `--cold-clients-mib`, only on the upstream: the concurrent cold pulls.
    pub cold_many: Blob,
    /// `cold` and `cold_huge` again, new bytes, for the pulls through the paced link (a few
    /// bytes each when it is not used).
    pub cold_paced: Blob,
    pub cold_huge_paced: Blob,
    pub manifest: Bytes,
    pub manifest_digest: String,
}

/// Writes the blobs into `dir`.
pub async fn make_blobs(o: &Options, dir: &Path) -> Result<Blobs> {
    std::fs::create_dir_all(dir)?;
    let mk = |name: &str, mib: u64, seed: u64| {
        let p = dir.join(name);
        async move {
            tokio::task::spawn_blocking(move || make_blob(&p, mib * MIB, seed))
                .await
                .map_err(|e| anyhow!("{e}"))?
        }
    };
    let small = mk("small.bin", 1, 1).await?;
    let big = mk("big.bin", o.big_mib, 2).await?;
    let huge = if o.wants("memory") {
        mk("huge.bin", o.huge_mib, 3).await?
    } else {
        write_blob(&dir.join("huge.bin"), b"not measured")?
    };
    let cold = mk("cold.bin", o.big_mib, 4).await?;
    let cold_huge = if o.wants("cold") && o.cold_huge_mib > 0 {
        mk("cold-huge.bin", o.cold_huge_mib, 6).await?
    } else {
        write_blob(&dir.join("cold-huge.bin"), b"not measured")?
    };
    let cold_many = mk("cold-many.bin", o.cold_clients_mib, 5).await?;
    let paced = o.wants("cold") && o.cold_link_mbs > 0;
    let cold_paced = if paced {
        mk("cold-paced.bin", o.big_mib, 7).await?
    } else {
        write_blob(&dir.join("cold-paced.bin"), b"not measured, paced")?
    };
    let cold_huge_paced = if paced && o.cold_huge_mib > 0 {
        mk("cold-huge-paced.bin", o.cold_huge_mib, 8).await?
    } else {
        write_blob(
            &dir.join("cold-huge-paced.bin"),
            b"not measured, paced huge",
        )?
    };
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [&small.digest, &big.digest]},
    });
    let config = write_blob(&dir.join("config.json"), &serde_json::to_vec(&config)?)?;
    let layer = |b: &Blob| {
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": b.digest,
            "size": b.size,
        })
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config.digest,
            "size": config.size,
        },
        "layers": [layer(&small), layer(&big)],
    });
    let manifest = Bytes::from(serde_json::to_vec_pretty(&manifest)?);
    let manifest_digest = digest_of(&manifest);
    Ok(Blobs {
        config,
        small,
        big,
        huge,
        cold,
        cold_huge,
        cold_many,
        cold_paced,
        cold_huge_paced,
        manifest,
        manifest_digest,
    })
}
