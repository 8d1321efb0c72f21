use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::Stream;
use kache_oci::{ParsedManifest, RepoName, media_type};

use super::*;
use crate::index::NewManifest;

fn repo(s: &str) -> RepoName {
    s.parse().unwrap()
}

fn body(b: &'static [u8]) -> impl Stream<Item = std::result::Result<Bytes, std::io::Error>> {
    futures_util::stream::iter(b.chunks(3).map(|c| Ok(Bytes::from_static(c))))
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(files_under(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

fn image_manifest(config: &Digest, layer: &Digest) -> Bytes {
    Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":5}}]}}"#,
        media_type::OCI_MANIFEST
    ))
}

#[tokio::test]
async fn digest_mismatch_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let wrong = Digest::sha256(b"something else");
    let err = store
        .put_blob(&repo("r"), &wrong, body(b"hello"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }));
    assert_eq!(
        files_under(&dir.path().join("blobs")),
        Vec::<PathBuf>::new()
    );
    assert_eq!(files_under(&dir.path().join("tmp")), Vec::<PathBuf>::new());
    assert_eq!(store.total_bytes(), 0);
}

/// Offsets and scoping are the suite's (`uploads_check_their_offsets_...`); the restart in
/// the middle of a session is the filesystem store's own.
#[tokio::test]
async fn a_chunked_upload_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let r = repo("r");
    let id = {
        let (store, _) = Store::open(dir.path()).unwrap();
        let s = store.start_upload(&r).await.unwrap();
        let st = store
            .append_upload(&r, &s.id, Some(0), body(b"hello "))
            .await
            .unwrap();
        assert_eq!(st.offset, 6);
        s.id
    };
    let (store, rec) = Store::open(dir.path()).unwrap();
    assert_eq!(rec.stale_uploads_removed, 0);
    assert_eq!(store.upload_status(&r, &id).await.unwrap().offset, 6);
    let d = Digest::sha256(b"hello world");
    store
        .complete_upload(&r, &id, None, &d, body(b"world"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(store.blob_path(&d)).unwrap(), b"hello world");
    assert!(matches!(
        store.upload_status(&r, &id).await,
        Err(StoreError::UploadUnknown)
    ));
    assert_eq!(
        files_under(&dir.path().join("uploads")),
        Vec::<PathBuf>::new()
    );
}

#[tokio::test]
async fn open_repairs_what_a_crash_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let d = Digest::sha256(b"kept");
    let gone = Digest::sha256(b"gone");
    {
        let (store, _) = Store::open(dir.path()).unwrap();
        store.put_blob(&repo("r"), &d, body(b"kept")).await.unwrap();
        store
            .put_blob(&repo("r"), &gone, body(b"gone"))
            .await
            .unwrap();
        std::fs::remove_file(store.blob_path(&gone)).unwrap();
    }
    std::fs::write(dir.path().join("tmp/half-written"), b"partial").unwrap();
    std::fs::write(dir.path().join("uploads/not-a-session"), b"x").unwrap();
    let orphan = Digest::sha256(b"orphan");
    let p = Layout::new(dir.path()).blob(&orphan);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, b"orphan").unwrap();

    let (store, rec) = Store::open(dir.path()).unwrap();
    assert_eq!(
        rec,
        Recovery {
            temp_files_removed: 1,
            missing_blobs_forgotten: 1,
            orphan_blobs_adopted: 1,
            stale_uploads_removed: 1,
        }
    );
    assert_eq!(store.stat_blob(&repo("r"), &gone).unwrap(), None);
    assert_eq!(store.total_bytes(), 4 + 6);
    let report = store.verify().await.unwrap();
    assert_eq!((report.blobs, report.bad.len()), (2, 0));
}

#[tokio::test]
async fn verify_finds_a_corrupted_blob() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let d = Digest::sha256(b"good bytes");
    store
        .put_blob(&repo("r"), &d, body(b"good bytes"))
        .await
        .unwrap();
    std::fs::write(store.blob_path(&d), b"evil bytes").unwrap();
    let report = store.verify().await.unwrap();
    assert_eq!(report.bad.len(), 1, "{report:?}");
}

#[tokio::test]
async fn verify_reports_its_progress_after_every_blob() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let blobs: [&[u8]; 3] = [b"one", b"two bytes", b"three"];
    for b in blobs {
        store
            .put_blob(&repo("r"), &Digest::sha256(b), body(b))
            .await
            .unwrap();
    }
    std::fs::write(store.blob_path(&Digest::sha256(b"two bytes")), b"tampered!").unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let report = store
        .verify_with({
            let seen = seen.clone();
            move |p| seen.lock().unwrap().push(*p)
        })
        .await
        .unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for (i, p) in seen.iter().enumerate() {
        assert_eq!((p.checked, p.total), (i as u64 + 1, 3), "{p:?}");
    }
    let last = seen[2];
    assert_eq!((last.bytes, last.bad), (3 + 5, 1), "{last:?}");
    assert_eq!(report.bad.len(), 1, "{report:?}");
}

#[tokio::test]
async fn expired_uploads_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let r = repo("r");
    let s = store.start_upload(&r).await.unwrap();
    assert_eq!(
        store
            .expire_uploads(std::time::Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    // Nothing younger than "now minus zero" survives a cutoff in the future.
    let mut rec = store.index.upload(&s.id.to_string()).unwrap().unwrap();
    rec.updated -= 10;
    store.index.put_upload(&s.id.to_string(), &rec).unwrap();
    assert_eq!(
        store
            .expire_uploads(std::time::Duration::from_secs(5))
            .await
            .unwrap(),
        1
    );
    assert!(matches!(
        store.upload_status(&r, &s.id).await,
        Err(StoreError::UploadUnknown)
    ));
}

/// A blob may be deleted between the early check of `put_manifest` and its index transaction.
/// The transaction re-checks, so the manifest is refused rather than stored pointing at nothing.
#[tokio::test]
async fn the_index_transaction_rechecks_blobs_a_manifest_needs() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let r = repo("race");
    let (c, l) = (Digest::sha256(b"{}"), Digest::sha256(b"layer"));
    store.put_blob(&r, &c, body(b"{}")).await.unwrap();
    store.put_blob(&r, &l, body(b"layer")).await.unwrap();
    let bytes = image_manifest(&c, &l);
    let parsed = ParsedManifest::parse(&bytes, None).unwrap();
    let digest = Digest::sha256(&bytes);
    // The early check passed; now the layer goes before the transaction runs.
    store.delete_blob(&r, &l).await.unwrap();
    let record = ManifestRecord {
        media_type: parsed.media_type.clone(),
        size: bytes.len() as u64,
        artifact_type: None,
        subject: None,
        annotations: None,
        created: 0,
    };
    let err = store
        .index
        .put_manifest(NewManifest {
            repo: &r,
            digest: &digest,
            record,
            tag: Some("v1"),
            required: parsed.required_blobs().map(|d| d.digest.clone()).collect(),
            references: parsed.references().cloned().collect(),
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::ManifestBlobUnknown(d) if d == l));
    assert!(store.tag(&r, "v1").unwrap().is_none());
    assert!(store.index.manifest(&r, &digest).unwrap().is_none());
    assert!(
        store.references(&digest).unwrap().is_empty(),
        "nothing of the refused manifest is recorded"
    );
}

/// The behaviour every storage backend owes the registry (crate::suite), on this one.
mod suite_on_store {
    use std::sync::Arc;

    use crate::{Limits, MinFree, Storage, Store};

    crate::storage_suite!(|| {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        store.set_limits(Limits {
            max_size: None,
            min_free: MinFree::Bytes(0),
        });
        (dir, Arc::new(store) as Arc<dyn Storage>)
    });
}

/// The index records what a manifest references (its config and layers), which collection
/// marks from; the suite sees only what the trait shows, so it is checked here.
#[tokio::test]
async fn a_manifest_s_references_are_its_config_and_layers() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let r = repo("r");
    let (c, l) = (Digest::sha256(b"{}"), Digest::sha256(b"layer"));
    store.put_blob(&r, &c, body(b"{}")).await.unwrap();
    store.put_blob(&r, &l, body(b"layer")).await.unwrap();
    let bytes = image_manifest(&c, &l);
    let parsed = ParsedManifest::parse(&bytes, None).unwrap();
    let tag = "v1".parse().unwrap();
    let d = store.put_manifest(&r, &tag, bytes, &parsed).await.unwrap();
    let mut refs = store.references(&d).unwrap();
    refs.sort();
    let mut want = vec![c, l];
    want.sort();
    assert_eq!(refs, want);
}

/// A grant or a visibility, once written, is there after a restart.
#[tokio::test]
async fn grants_and_visibility_survive_a_restart() {
    use kache_wire::{Grant, Visibility};
    let dir = tempfile::tempdir().unwrap();
    let r = repo("ghcr.io/team/app");
    let grant = Grant {
        repository: r.to_string(),
        namespace: "ns".to_owned(),
        verified_at: 1,
        expires_at: 2,
    };
    {
        let (store, _) = Store::open(dir.path()).unwrap();
        Storage::set_visibility(&store, &r, Visibility::Private)
            .await
            .unwrap();
        Storage::put_grant(&store, &r, &grant).await.unwrap();
    }
    let (store, _) = Store::open(dir.path()).unwrap();
    assert_eq!(
        Storage::visibility(&store, &r).unwrap(),
        Some(Visibility::Private)
    );
    assert_eq!(Storage::grant(&store, &r, "ns").unwrap(), Some(grant));
}
