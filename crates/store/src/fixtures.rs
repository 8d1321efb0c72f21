//! Synthetic stores for benchmarks and scale tests (feature `fixtures`): many small blobs under
//! many manifests in many repositories, written straight to disk and into the index in large
//! transactions, so a store of 100,000 blobs takes seconds to make, not the hours of one
//! fsynced commit per blob. The result is an ordinary store: `Store::open` reads it, `verify`
//! checks it, garbage collection marks and sweeps it.

use std::path::Path;

use kache_oci::{Digest, RepoName, media_type};

use crate::error::Result;
use crate::fs::Layout;
use crate::index::{BlobRecord, Index, ManifestRecord, TagRecord, now};

/// What to make.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Manifests in all; each has its own config and `layers` layers.
    pub manifests: usize,
    pub layers: usize,
    /// Layers every manifest shares with others: this many of each manifest's layers are drawn
    /// from a pool of `shared_pool` base layers.
    pub shared: usize,
    pub shared_pool: usize,
    /// Repositories the manifests are spread over, in turn.
    pub repositories: usize,
    /// One manifest in this many is untagged: garbage, with its config and own layers.
    pub untagged_every: usize,
    /// Bytes of each layer and config.
    pub blob_size: usize,
    /// Written and last used this long ago (seconds): older than any grace period.
    pub age_secs: u64,
    /// Tags beside `v<m>` on the sample image (`t00000`, `t00001`...): one repository with a
    /// long tag list.
    pub extra_tags: usize,
}

/// What was made.
#[derive(Debug, Clone)]
pub struct Made {
    pub blobs: usize,
    pub manifests: usize,
    pub repositories: usize,
    /// The repositories: manifest `m` (tag `v<m>`) is in `repositories_names[m % len]`.
    pub repositories_names: Vec<RepoName>,
    pub bytes: u64,
    /// A tagged image: its repository, tag, manifest digest and one of its layers.
    pub sample: (RepoName, String, Digest, Digest),
    /// Blobs only untagged manifests hold: what a collection with no limits removes.
    pub garbage_blobs: usize,
}

fn content(kind: u8, n: usize, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    let mut x = (n as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(kind);
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size);
    out
}

/// Makes a store under `root` (which must not hold one yet).
pub fn make(root: &Path, spec: &Spec) -> Result<Made> {
    let layout = Layout::new(root);
    for d in [layout.blobs(), layout.tmp(), layout.uploads()] {
        std::fs::create_dir_all(d)?;
    }
    let index = Index::open(&layout.index())?;
    let then = now().saturating_sub(spec.age_secs);
    let mut bytes = 0u64;
    let mut written = std::collections::HashSet::new();
    let mut write = |bytes_: &[u8], batch: &mut crate::index::Bulk| -> Result<Digest> {
        let d = Digest::sha256(bytes_);
        if written.insert(d.clone()) {
            let path = layout.blob(&d);
            std::fs::create_dir_all(path.parent().expect("blob paths have a parent"))?;
            std::fs::write(&path, bytes_)?;
            bytes += bytes_.len() as u64;
            batch.blobs.push((
                d.clone(),
                BlobRecord {
                    size: bytes_.len() as u64,
                    created: then,
                },
            ));
        }
        Ok(d)
    };
    let repos: Vec<RepoName> = (0..spec.repositories)
        .map(|r| {
            format!("fixture/repo-{r:05}")
                .parse()
                .expect("a valid name")
        })
        .collect();
    let mut batch = crate::index::Bulk::default();
    let mut sample = None;
    let mut garbage = 0;
    // Shared layers, by whether a tagged manifest uses them: those only untagged ones use are
    // garbage too.
    let mut kept_shared = std::collections::HashSet::new();
    let mut untagged_shared = std::collections::HashSet::new();
    let descriptor = |mt: &str, d: &Digest, size: usize| {
        format!(r#"{{"mediaType":"{mt}","digest":"{d}","size":{size}}}"#)
    };
    for m in 0..spec.manifests {
        let repo = &repos[m % repos.len()];
        let config = write(&content(1, m, spec.blob_size), &mut batch)?;
        let mut layers = Vec::with_capacity(spec.layers);
        for l in 0..spec.layers {
            let (kind, n) = if l < spec.shared {
                (2, (m * 7 + l) % spec.shared_pool.max(1))
            } else {
                (3, m * spec.layers + l)
            };
            layers.push(write(&content(kind, n, spec.blob_size), &mut batch)?);
        }
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{},"layers":[{}]}}"#,
            media_type::OCI_MANIFEST,
            descriptor(
                "application/vnd.oci.image.config.v1+json",
                &config,
                spec.blob_size
            ),
            layers
                .iter()
                .map(|d| descriptor("application/vnd.oci.image.layer.v1.tar", d, spec.blob_size))
                .collect::<Vec<_>>()
                .join(",")
        );
        let digest = write(body.as_bytes(), &mut batch)?;
        let tagged = spec.untagged_every == 0 || m % spec.untagged_every != 0;
        let shared_here = (0..spec.shared.min(spec.layers)).map(|l| layers[l].clone());
        if tagged {
            kept_shared.extend(shared_here);
        } else {
            // The manifest, its config and its own layers.
            garbage += 2 + spec.layers - spec.shared.min(spec.layers);
            untagged_shared.extend(shared_here);
        }
        let mut references = vec![config.clone()];
        references.extend(layers.iter().cloned());
        for d in &references {
            batch.links.push((repo.clone(), d.clone()));
        }
        batch.links.push((repo.clone(), digest.clone()));
        batch.manifests.push((
            repo.clone(),
            digest.clone(),
            ManifestRecord {
                media_type: media_type::OCI_MANIFEST.into(),
                size: body.len() as u64,
                artifact_type: None,
                subject: None,
                annotations: None,
                created: then,
            },
            references,
        ));
        if tagged {
            let tag = format!("v{m}");
            if sample.is_none() {
                sample = Some((
                    repo.clone(),
                    tag.clone(),
                    digest.clone(),
                    layers[layers.len() - 1].clone(),
                ));
                for t in 0..spec.extra_tags {
                    batch.tags.push((
                        repo.clone(),
                        format!("t{t:05}"),
                        TagRecord {
                            digest: digest.clone(),
                            updated: then,
                        },
                    ));
                }
            }
            batch.tags.push((
                repo.clone(),
                tag,
                TagRecord {
                    digest,
                    updated: then,
                },
            ));
        }
        if batch.len() >= 20_000 {
            index.bulk(std::mem::take(&mut batch))?;
        }
    }
    index.bulk(batch)?;
    Ok(Made {
        blobs: written.len(),
        manifests: spec.manifests,
        repositories: repos.len(),
        repositories_names: repos,
        bytes,
        sample: sample.expect("at least one tagged manifest"),
        garbage_blobs: garbage + untagged_shared.difference(&kept_shared).count(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_synthetic_store_opens_verifies_and_collects() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec {
            manifests: 40,
            layers: 4,
            shared: 2,
            shared_pool: 5,
            repositories: 7,
            untagged_every: 4,
            blob_size: 100,
            age_secs: 7200,
            extra_tags: 30,
        };
        let made = make(dir.path(), &spec).unwrap();
        // Configs, own layers, the shared pool, manifests.
        assert_eq!(made.blobs, 40 + 40 * 2 + 5 + 40);
        let (store, recovery) = crate::Store::open(dir.path()).unwrap();
        // Whatever the free space of the machine running the test.
        store.set_limits(crate::Limits {
            max_size: None,
            min_free: crate::MinFree::Bytes(0),
        });
        assert_eq!(recovery, crate::Recovery::default(), "nothing to repair");
        assert_eq!(store.total_bytes(), made.bytes);
        assert_eq!(store.verify().await.unwrap().bad, Vec::<String>::new());
        let (repo, tag, digest, layer) = made.sample.clone();
        let m = store
            .get_manifest(&repo, &tag.parse().unwrap())
            .await
            .unwrap();
        assert_eq!(m.digest, digest);
        assert!(store.stat_blob(&repo, &layer).unwrap().is_some());
        let extra = store.list_tags(&repo, Some("t00009"), 21).unwrap();
        assert_eq!(extra.len(), 21, "{extra:?}");
        assert_eq!(
            (&*extra[0], &*extra[19], &*extra[20]),
            ("t00010", "t00029", &*tag),
        );
        let store = std::sync::Arc::new(store);
        let report = store
            .collect(crate::GcOptions {
                grace: std::time::Duration::from_secs(60),
                ..crate::GcOptions::default()
            })
            .await
            .unwrap();
        assert_eq!(report.removed_blobs as usize, made.garbage_blobs);
        assert_eq!(report.removed_manifests, 10);
    }
}
