use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::Stream;
use kache_oci::{Algorithm, ParsedManifest, Reference, RepoName, media_type};

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
async fn blob_round_trip_and_repository_scoping() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let a = repo("a/b");
    let d = Digest::sha256(b"hello world");
    assert_eq!(
        store.put_blob(&a, &d, body(b"hello world")).await.unwrap(),
        11
    );
    assert_eq!(store.stat_blob(&a, &d).unwrap(), Some(11));
    assert_eq!(
        store.stat_blob(&repo("a"), &d).unwrap(),
        None,
        "other repository"
    );
    assert_eq!(store.total_bytes(), 11);
    let on_disk = std::fs::read(store.blob_path(&d)).unwrap();
    assert_eq!(on_disk, b"hello world");
    // Mount needs the source repository to hold it.
    assert_eq!(
        store
            .mount_blob(&repo("c"), &d, Some(&repo("x")))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.mount_blob(&repo("c"), &d, Some(&a)).await.unwrap(),
        Some(11)
    );
    assert_eq!(store.stat_blob(&repo("c"), &d).unwrap(), Some(11));
    store.delete_blob(&a, &d).await.unwrap();
    assert_eq!(store.stat_blob(&a, &d).unwrap(), None);
    assert!(matches!(
        store.delete_blob(&a, &d).await,
        Err(StoreError::BlobUnknown)
    ));
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

#[tokio::test]
async fn chunked_upload_survives_restart_and_checks_offsets() {
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
        let err = store
            .append_upload(&r, &s.id, Some(3), body(b"x"))
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            StoreError::RangeInvalid {
                expected: 6,
                got: 3
            }
        ));
        assert!(matches!(
            store.upload_status(&repo("other"), &s.id).await,
            Err(StoreError::UploadUnknown)
        ));
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
async fn sha512_upload_and_wrong_digest_ends_session() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let r = repo("r");
    let s = store.start_upload(&r).await.unwrap();
    let d = Digest::compute(Algorithm::Sha512, b"abc");
    store
        .complete_upload(&r, &s.id, None, &d, body(b"abc"))
        .await
        .unwrap();
    assert_eq!(store.stat_blob(&r, &d).unwrap(), Some(3));

    let s = store.start_upload(&r).await.unwrap();
    let err = store
        .complete_upload(&r, &s.id, None, &Digest::sha256(b"no"), body(b"abc"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }));
    assert!(matches!(
        store.upload_status(&r, &s.id).await,
        Err(StoreError::UploadUnknown)
    ));
    assert_eq!(
        files_under(&dir.path().join("uploads")),
        Vec::<PathBuf>::new()
    );
}

#[tokio::test]
async fn manifests_need_their_blobs_and_deletes_cascade_to_tags() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let r = repo("r");
    let (c, l) = (Digest::sha256(b"{}"), Digest::sha256(b"layer"));
    let bytes = image_manifest(&c, &l);
    let parsed = ParsedManifest::parse(&bytes, None).unwrap();
    let tag: Reference = "v1".parse().unwrap();
    store.put_blob(&r, &c, body(b"{}")).await.unwrap();
    let err = store
        .put_manifest(&r, &tag, bytes.clone(), &parsed)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::ManifestBlobUnknown(d) if d == l));
    assert!(matches!(
        store.get_manifest(&r, &tag).await,
        Err(StoreError::ManifestUnknown)
    ));

    store.put_blob(&r, &l, body(b"layer")).await.unwrap();
    let d = store
        .put_manifest(&r, &tag, bytes.clone(), &parsed)
        .await
        .unwrap();
    store
        .put_manifest(&r, &"v2".parse().unwrap(), bytes.clone(), &parsed)
        .await
        .unwrap();
    let m = store.get_manifest(&r, &tag).await.unwrap();
    assert_eq!((m.digest.clone(), m.bytes), (d.clone(), bytes));
    assert_eq!(m.media_type, media_type::OCI_MANIFEST);
    assert_eq!(store.list_tags(&r, None, 10).unwrap(), ["v1", "v2"]);
    assert_eq!(store.references(&d).unwrap().len(), 2);

    store
        .delete_manifest(&r, &"v2".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(store.list_tags(&r, None, 10).unwrap(), ["v1"]);
    store
        .delete_manifest(&r, &Reference::Digest(d.clone()))
        .await
        .unwrap();
    assert_eq!(store.list_tags(&r, None, 10).unwrap(), Vec::<String>::new());
    assert!(matches!(
        store.get_manifest(&r, &Reference::Digest(d)).await,
        Err(StoreError::ManifestUnknown)
    ));
    assert!(matches!(
        store.list_tags(&repo("nope"), None, 10),
        Err(StoreError::NameUnknown)
    ));
}

#[tokio::test]
async fn tag_pagination_is_lexical_and_repository_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let bytes = Bytes::from_static(br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#);
    let parsed = ParsedManifest::parse(&bytes, None).unwrap();
    for (r, t) in [
        ("a", "b"),
        ("a", "a"),
        ("a", "c"),
        ("a/x", "zz"),
        ("a-b", "q"),
    ] {
        store
            .put_manifest(&repo(r), &t.parse().unwrap(), bytes.clone(), &parsed)
            .await
            .unwrap();
    }
    let a = repo("a");
    assert_eq!(store.list_tags(&a, None, 100).unwrap(), ["a", "b", "c"]);
    assert_eq!(store.list_tags(&a, None, 2).unwrap(), ["a", "b"]);
    assert_eq!(store.list_tags(&a, Some("b"), 2).unwrap(), ["c"]);
    assert_eq!(
        store.list_tags(&a, Some("c"), 2).unwrap(),
        Vec::<String>::new()
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

#[tokio::test]
async fn the_catalog_lists_every_repository_once_in_order_and_pages() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    assert!(store.repositories(None, 10).unwrap().is_empty());
    let names = ["b", "a/b", "a", "a/b/c", "a-b", "docker.io/library/nginx"];
    for (i, n) in names.iter().enumerate() {
        // Several blobs in some: a name is listed once however many it holds.
        for j in 0..=(i % 3) {
            let bytes = format!("{n} {j}");
            let d = Digest::sha256(bytes.as_bytes());
            let b = Bytes::from(bytes);
            store
                .put_blob(
                    &repo(n),
                    &d,
                    futures_util::stream::iter([Ok::<_, std::io::Error>(b)]),
                )
                .await
                .unwrap();
        }
    }
    // A repository that holds only a manifest (a pulled one is not linked as a blob) counts.
    let config = Digest::sha256(b"{}");
    let layer = Digest::sha256(b"layer");
    let m = image_manifest(&config, &layer);
    let parsed = ParsedManifest::parse(&m, Some(media_type::OCI_MANIFEST)).unwrap();
    store
        .put_pulled_manifest(
            &repo("m/only"),
            &Reference::Tag("v1".parse().unwrap()),
            m,
            &parsed,
        )
        .await
        .unwrap();
    let names = [&names[..], &["m/only"]].concat();
    let all = store.repositories(None, 100).unwrap();
    let mut want: Vec<&str> = names.to_vec();
    want.sort();
    assert_eq!(all, want);
    // Pages of two, each after the last name of the one before.
    let mut paged = Vec::new();
    let mut last: Option<String> = None;
    loop {
        let page = store.repositories(last.as_deref(), 2).unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        last = page.last().cloned();
        paged.extend(page);
    }
    assert_eq!(paged, want);
    // After a name that is not one: from where it would sort.
    assert_eq!(
        store.repositories(Some("a/a"), 2).unwrap(),
        ["a/b", "a/b/c"]
    );
}
