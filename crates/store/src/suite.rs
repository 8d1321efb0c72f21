//! The behaviour every [`Storage`] owes the registry, as tests any backend runs: each case takes
//! a new, empty store without space limits and speaks to it through the trait alone.
//!
//! A backend runs them all with [`storage_suite!`](crate::storage_suite), given how to open
//! one (a guard that keeps its place alive, and the store):
//!
//! ```ignore
//! kache_store::storage_suite!(|| {
//!     let dir = tempfile::tempdir().unwrap();
//!     let (store, _) = kache_store::Store::open(dir.path()).unwrap();
//!     (dir, std::sync::Arc::new(store) as std::sync::Arc<dyn kache_store::Storage>)
//! });
//! ```
//!
//! What only one backend can show (files on disk, repairs after a crash) stays in its own
//! tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use kache_oci::{Algorithm, Digest, ParsedManifest, Reference, RepoName, media_type};

use crate::storage::{Body, Storage};
use kache_wire::{Grant, Visibility};

use crate::{FetchError, GcOptions, KeptImage, Sharing, Source, SourceFn, StoreError};

/// One test function per case, each on a store `open` makes: `open` returns a guard held for
/// the test's length and an `Arc<dyn Storage>`.
#[macro_export]
macro_rules! storage_suite {
    ($open:expr) => {
        $crate::storage_suite!(@cases $open;
            blobs_are_scoped_to_the_repositories_that_hold_them,
            a_blob_that_does_not_hash_to_its_digest_is_not_kept,
            uploads_check_their_offsets_repositories_and_digests,
            manifests_need_their_blobs_and_deletes_cascade_to_tags,
            pulled_manifests_wait_for_their_blobs_and_tags_keep_their_confirmation,
            tags_page_in_order_within_their_repository,
            the_catalog_lists_every_repository_once_in_order_and_pages,
            referrers_are_listed_by_their_subject,
            a_fetched_blob_is_fetched_once_verified_and_kept,
            a_fetched_blob_that_does_not_verify_is_never_kept,
            a_fetch_with_a_repository_s_own_access_is_joined_by_that_repository_only,
            collection_removes_what_nothing_references_and_keeps_kept_images,
            stale_uploads_expire,
            what_is_served_is_remembered_once_flushed,
            a_private_repository_s_blobs_are_never_linked_elsewhere_without_their_bytes,
            grants_are_kept_per_repository_and_namespace,
            a_collection_forgets_who_may_read_a_repository_that_holds_nothing,
        );
    };
    (@cases $open:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                let (_guard, store) = ($open)();
                $crate::suite::$case(store).await;
            }
        )*
    };
}

fn repo(s: &str) -> RepoName {
    s.parse().unwrap()
}

/// `bytes` as a request body, in 3-byte chunks.
fn body(bytes: &[u8]) -> Body {
    let chunks: Vec<_> = bytes
        .chunks(3)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Box::pin(futures_util::stream::iter(chunks))
}

async fn put(store: &dyn Storage, r: &RepoName, bytes: &[u8]) -> Digest {
    let d = Digest::sha256(bytes);
    assert_eq!(
        store.put_blob(r, &d, body(bytes)).await.unwrap(),
        bytes.len() as u64
    );
    d
}

fn image_manifest(config: &Digest, layer: &Digest) -> Bytes {
    Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":5}}]}}"#,
        media_type::OCI_MANIFEST
    ))
}

/// An image of two blobs pushed into `r` as `tag`; its manifest's digest and its blobs.
async fn push_image(
    store: &dyn Storage,
    r: &RepoName,
    tag: &str,
    salt: &str,
) -> (Digest, [Digest; 2]) {
    let config = put(store, r, b"{}").await;
    let layer = put(store, r, format!("layer {salt}").as_bytes()).await;
    let bytes = image_manifest(&config, &layer);
    let parsed = ParsedManifest::parse(&bytes, None).unwrap();
    let m = store
        .put_manifest(r, &tag.parse().unwrap(), bytes, &parsed)
        .await
        .unwrap();
    (m, [config, layer])
}

async fn read_blob(store: &dyn Storage, r: &RepoName, d: &Digest) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut blob = store.open_blob(r, d).await.unwrap();
    let mut bytes = Vec::new();
    blob.file.read_to_end(&mut bytes).await.unwrap();
    assert_eq!(bytes.len() as u64, blob.size);
    bytes
}

pub async fn blobs_are_scoped_to_the_repositories_that_hold_them(store: Arc<dyn Storage>) {
    let a = repo("a/b");
    let d = put(&*store, &a, b"hello world").await;
    assert_eq!(store.stat_blob(&a, &d).unwrap(), Some(11));
    assert_eq!(read_blob(&*store, &a, &d).await, b"hello world");
    assert_eq!(
        store.stat_blob(&repo("a"), &d).unwrap(),
        None,
        "another repository"
    );
    assert!(matches!(
        store.open_blob(&repo("a"), &d).await,
        Err(StoreError::BlobUnknown)
    ));
    assert_eq!(store.total_bytes(), 11);
    // A mount needs its source repository to hold the blob; without one, any repository may.
    let c = repo("c");
    assert_eq!(
        store.mount_blob(&c, &d, Some(&repo("x"))).await.unwrap(),
        None
    );
    assert_eq!(store.mount_blob(&c, &d, Some(&a)).await.unwrap(), Some(11));
    assert_eq!(
        store.mount_blob(&repo("e"), &d, None).await.unwrap(),
        Some(11)
    );
    assert_eq!(store.stat_blob(&c, &d).unwrap(), Some(11));
    assert_eq!(
        store.total_bytes(),
        11,
        "one copy, however many repositories"
    );
    store.delete_blob(&a, &d).await.unwrap();
    assert_eq!(store.stat_blob(&a, &d).unwrap(), None);
    assert_eq!(store.stat_blob(&c, &d).unwrap(), Some(11), "still in c");
    assert!(matches!(
        store.delete_blob(&a, &d).await,
        Err(StoreError::BlobUnknown)
    ));
}

pub async fn a_blob_that_does_not_hash_to_its_digest_is_not_kept(store: Arc<dyn Storage>) {
    let r = repo("r");
    let wrong = Digest::sha256(b"something else");
    let err = store
        .put_blob(&r, &wrong, body(b"hello"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert_eq!(store.stat_blob(&r, &wrong).unwrap(), None);
    assert_eq!(
        store.stat_blob(&r, &Digest::sha256(b"hello")).unwrap(),
        None
    );
    assert_eq!(store.total_bytes(), 0);
}

pub async fn uploads_check_their_offsets_repositories_and_digests(store: Arc<dyn Storage>) {
    let r = repo("r");
    let s = store.start_upload(&r).await.unwrap();
    assert_eq!(s.offset, 0);
    let st = store
        .append_upload(&r, &s.id, Some(0), body(b"hello "))
        .await
        .unwrap();
    assert_eq!(st.offset, 6);
    let err = store
        .append_upload(&r, &s.id, Some(3), body(b"x"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::RangeInvalid {
                expected: 6,
                got: 3
            }
        ),
        "{err}"
    );
    assert!(matches!(
        store.upload_status(&repo("other"), &s.id).await,
        Err(StoreError::UploadUnknown)
    ));
    assert_eq!(store.upload_status(&r, &s.id).await.unwrap().offset, 6);
    let d = Digest::sha256(b"hello world");
    assert_eq!(
        store
            .complete_upload(&r, &s.id, None, &d, body(b"world"))
            .await
            .unwrap(),
        11
    );
    assert_eq!(read_blob(&*store, &r, &d).await, b"hello world");
    assert!(matches!(
        store.upload_status(&r, &s.id).await,
        Err(StoreError::UploadUnknown)
    ));

    // Another algorithm; and a wrong digest ends the session, keeping nothing.
    let s = store.start_upload(&r).await.unwrap();
    let d512 = Digest::compute(Algorithm::Sha512, b"abc");
    store
        .complete_upload(&r, &s.id, None, &d512, body(b"abc"))
        .await
        .unwrap();
    assert_eq!(store.stat_blob(&r, &d512).unwrap(), Some(3));
    let s = store.start_upload(&r).await.unwrap();
    let err = store
        .complete_upload(&r, &s.id, None, &Digest::sha256(b"no"), body(b"abc"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert!(matches!(
        store.upload_status(&r, &s.id).await,
        Err(StoreError::UploadUnknown)
    ));

    // A cancelled session is gone.
    let s = store.start_upload(&r).await.unwrap();
    store.cancel_upload(&r, &s.id).await.unwrap();
    assert!(matches!(
        store.upload_status(&r, &s.id).await,
        Err(StoreError::UploadUnknown)
    ));
}

pub async fn manifests_need_their_blobs_and_deletes_cascade_to_tags(store: Arc<dyn Storage>) {
    let r = repo("r");
    let (c, l) = (Digest::sha256(b"{}"), Digest::sha256(b"layer"));
    let bytes = image_manifest(&c, &l);
    let parsed = ParsedManifest::parse(&bytes, None).unwrap();
    let v1: Reference = "v1".parse().unwrap();
    put(&*store, &r, b"{}").await;
    let err = store
        .put_manifest(&r, &v1, bytes.clone(), &parsed)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::ManifestBlobUnknown(ref d) if *d == l),
        "{err}"
    );
    assert!(matches!(
        store.get_manifest(&r, &v1).await,
        Err(StoreError::ManifestUnknown)
    ));

    put(&*store, &r, b"layer").await;
    let d = store
        .put_manifest(&r, &v1, bytes.clone(), &parsed)
        .await
        .unwrap();
    let v2: Reference = "v2".parse().unwrap();
    store
        .put_manifest(&r, &v2, bytes.clone(), &parsed)
        .await
        .unwrap();
    let m = store.get_manifest(&r, &v1).await.unwrap();
    assert_eq!((m.digest.clone(), m.bytes), (d.clone(), bytes.clone()));
    assert_eq!(m.media_type, media_type::OCI_MANIFEST);
    let by_digest = store
        .get_manifest(&r, &Reference::Digest(d.clone()))
        .await
        .unwrap();
    assert_eq!(by_digest.bytes, bytes);
    assert_eq!(store.tag(&r, "v1").unwrap().unwrap().digest, d);
    assert_eq!(store.list_tags(&r, None, 10).unwrap(), ["v1", "v2"]);
    assert!(
        store
            .get_manifest(&repo("elsewhere"), &Reference::Digest(d.clone()))
            .await
            .is_err(),
        "a manifest is scoped like a blob"
    );

    store.delete_manifest(&r, &v2).await.unwrap();
    assert_eq!(store.list_tags(&r, None, 10).unwrap(), ["v1"]);
    store
        .delete_manifest(&r, &Reference::Digest(d.clone()))
        .await
        .unwrap();
    assert_eq!(store.list_tags(&r, None, 10).unwrap(), Vec::<String>::new());
    assert_eq!(store.tag(&r, "v1").unwrap(), None);
    assert!(matches!(
        store.get_manifest(&r, &Reference::Digest(d)).await,
        Err(StoreError::ManifestUnknown)
    ));
    assert!(matches!(
        store.list_tags(&repo("nope"), None, 10),
        Err(StoreError::NameUnknown)
    ));
}

pub async fn pulled_manifests_wait_for_their_blobs_and_tags_keep_their_confirmation(
    store: Arc<dyn Storage>,
) {
    let r = repo("docker.io/library/app");
    let (c, l) = (Digest::sha256(b"{}"), Digest::sha256(b"layer"));
    let bytes = image_manifest(&c, &l);
    let parsed = ParsedManifest::parse(&bytes, None).unwrap();
    let latest: Reference = "latest".parse().unwrap();
    let d = store
        .put_pulled_manifest(&r, &latest, bytes.clone(), &parsed)
        .await
        .expect("no blob needed yet");
    assert_eq!(store.get_manifest(&r, &latest).await.unwrap().digest, d);
    assert_eq!(store.stat_blob(&r, &l).unwrap(), None, "fetched on demand");
    let before = store.tag(&r, "latest").unwrap().unwrap();
    assert_eq!(before.digest, d);
    // Whole seconds: wait for the next one, so that a confirmation is seen to move the record.
    let second = before.updated;
    while unix_now() == second {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store.touch_tag(&r, "latest").await.unwrap();
    let after = store.tag(&r, "latest").unwrap().unwrap();
    assert_eq!(after.digest, d);
    assert!(after.updated > before.updated, "{before:?} then {after:?}");
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub async fn tags_page_in_order_within_their_repository(store: Arc<dyn Storage>) {
    let bytes = Bytes::from_static(
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
    );
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

pub async fn the_catalog_lists_every_repository_once_in_order_and_pages(store: Arc<dyn Storage>) {
    assert!(store.repositories(None, 10).unwrap().is_empty());
    let names = ["b", "a/b", "a", "a/b/c", "a-b", "docker.io/library/nginx"];
    for (i, n) in names.iter().enumerate() {
        // Several blobs in some: a name is listed once however many it holds.
        for j in 0..=(i % 3) {
            put(&*store, &repo(n), format!("{n} {j}").as_bytes()).await;
        }
    }
    // A repository that holds only a manifest (a pulled one is not linked as a blob) counts.
    let m = image_manifest(&Digest::sha256(b"{}"), &Digest::sha256(b"layer"));
    let parsed = ParsedManifest::parse(&m, Some(media_type::OCI_MANIFEST)).unwrap();
    store
        .put_pulled_manifest(&repo("m/only"), &"v1".parse().unwrap(), m, &parsed)
        .await
        .unwrap();
    let mut want: Vec<&str> = [&names[..], &["m/only"]].concat();
    want.sort();
    assert_eq!(store.repositories(None, 100).unwrap(), want);
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

pub async fn referrers_are_listed_by_their_subject(store: Arc<dyn Storage>) {
    let r = repo("r");
    let (subject, _) = push_image(&*store, &r, "v1", "subject").await;
    let empty = put(&*store, &r, b"{}").await;
    let bytes = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","artifactType":"application/vnd.example.sbom","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{empty}","size":2}},"layers":[],"subject":{{"mediaType":"{}","digest":"{subject}","size":1}}}}"#,
        media_type::OCI_MANIFEST,
        media_type::OCI_MANIFEST,
    ));
    let parsed = ParsedManifest::parse(&bytes, None).unwrap();
    let sbom = Digest::sha256(&bytes);
    store
        .put_manifest(&r, &Reference::Digest(sbom.clone()), bytes.clone(), &parsed)
        .await
        .unwrap();
    let listed = store.referrers(&r, &subject).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].digest, sbom);
    assert_eq!(
        listed[0].record.artifact_type.as_deref(),
        Some("application/vnd.example.sbom")
    );
    assert_eq!(store.referrers(&repo("other"), &subject).unwrap().len(), 0);
}

/// A source of `bytes` in 4 KiB chunks that counts its calls.
fn source_of(bytes: Bytes, calls: Arc<AtomicUsize>) -> SourceFn {
    Arc::new(move || {
        calls.fetch_add(1, Ordering::SeqCst);
        let bytes = bytes.clone();
        Box::pin(async move {
            let chunks: Vec<Result<Bytes, FetchError>> = bytes
                .chunks(4096)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            Ok(Source {
                size: Some(bytes.len() as u64),
                body: Box::pin(futures_util::stream::iter(chunks)),
            })
        })
    })
}

async fn drain(
    mut body: std::pin::Pin<Box<dyn futures_util::Stream<Item = std::io::Result<Bytes>> + Send>>,
) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

pub async fn a_fetched_blob_is_fetched_once_verified_and_kept(store: Arc<dyn Storage>) {
    let bytes = Bytes::from(
        (0..100_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let d = Digest::sha256(&bytes);
    let (a, b) = (repo("docker.io/team/a"), repo("docker.io/team/b"));
    let calls = Arc::new(AtomicUsize::new(0));
    let source = source_of(bytes.clone(), calls.clone());
    let (first, second) = tokio::join!(
        store
            .clone()
            .fetch_blob(a.clone(), d.clone(), Sharing::Any, source.clone()),
        store
            .clone()
            .fetch_blob(b.clone(), d.clone(), Sharing::Any, source.clone()),
    );
    let (first, second) = (first.ok().unwrap(), second.ok().unwrap());
    assert_eq!(first.size, Some(bytes.len() as u64));
    let (x, y) = tokio::join!(drain(first.body), drain(second.body));
    assert_eq!(x.unwrap(), bytes);
    assert_eq!(y.unwrap(), bytes);
    // Both repositories that asked hold it, from the moment its last byte went out.
    for r in [&a, &b] {
        assert_eq!(
            store.stat_blob(r, &d).unwrap(),
            Some(bytes.len() as u64),
            "{r}"
        );
        assert_eq!(read_blob(&*store, r, &d).await, bytes);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one fetch for both");
}

/// A source like [`source_of`] whose last chunk waits until `released` says so: its fetch is
/// still running while the test asks for the same digest elsewhere.
fn held_source_of(
    bytes: Bytes,
    calls: Arc<AtomicUsize>,
    released: tokio::sync::watch::Receiver<bool>,
) -> SourceFn {
    Arc::new(move || {
        calls.fetch_add(1, Ordering::SeqCst);
        let (bytes, mut released) = (bytes.clone(), released.clone());
        Box::pin(async move {
            let (head, last) = bytes.split_at(bytes.len() - 1);
            let last = Bytes::copy_from_slice(last);
            let head = futures_util::stream::iter([Ok(Bytes::copy_from_slice(head))]);
            let last = futures_util::stream::once(async move {
                let _ = released.wait_for(|r| *r).await;
                Ok(last)
            });
            Ok(Source {
                size: Some(bytes.len() as u64),
                body: Box::pin(head.chain(last)),
            })
        })
    })
}

pub async fn a_fetch_with_a_repository_s_own_access_is_joined_by_that_repository_only(
    store: Arc<dyn Storage>,
) {
    let (private, public) = (
        repo("docker.io/team/private"),
        repo("docker.io/team/public"),
    );
    for (n, held_by) in [(0u8, Sharing::Repository), (1, Sharing::Any)] {
        let bytes = Bytes::from(vec![n; 50_000]);
        let d = Digest::sha256(&bytes);
        let (held_calls, other_calls) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (release, released) = tokio::sync::watch::channel(false);
        let held = held_source_of(bytes.clone(), held_calls.clone(), released);
        let other = source_of(bytes.clone(), other_calls.clone());
        // The held fetch runs until released; meanwhile the other repository asks.
        let (first, second) = match held_by {
            Sharing::Repository => (private.clone(), public.clone()),
            Sharing::Any => (public.clone(), private.clone()),
        };
        let running = store
            .clone()
            .fetch_blob(first.clone(), d.clone(), held_by, held)
            .await
            .ok()
            .unwrap();
        let sharing = match held_by {
            Sharing::Repository => Sharing::Any,
            Sharing::Any => Sharing::Repository,
        };
        let joined = store
            .clone()
            .fetch_blob(second.clone(), d.clone(), sharing, other);
        let joined = match held_by {
            // Another repository's request must not get bytes read with the private one's
            // access: it reads its own origin, and is served before the held fetch ends.
            Sharing::Repository => {
                // Bounded, so that a request that joined the held fetch fails the test rather
                // than waiting for a release that comes after it.
                let served = tokio::time::timeout(Duration::from_secs(30), async {
                    drain(joined.await.ok().unwrap().body).await.unwrap()
                });
                let served = served
                    .await
                    .expect("served without waiting for the held fetch");
                assert_eq!(served, bytes);
                assert_eq!(other_calls.load(Ordering::SeqCst), 1, "a fetch of its own");
                release.send_replace(true);
                None
            }
            // What anyone may read, a private repository's request shares.
            Sharing::Any => {
                let s = joined.await.ok().unwrap();
                release.send_replace(true);
                Some(s)
            }
        };
        assert_eq!(drain(running.body).await.unwrap(), bytes);
        if let Some(s) = joined {
            assert_eq!(drain(s.body).await.unwrap(), bytes);
            assert_eq!(
                other_calls.load(Ordering::SeqCst),
                0,
                "joined the running fetch"
            );
        }
        assert_eq!(held_calls.load(Ordering::SeqCst), 1);
        for r in [&first, &second] {
            assert_eq!(read_blob(&*store, r, &d).await, bytes, "{r}");
        }
    }
}

pub async fn a_fetched_blob_that_does_not_verify_is_never_kept(store: Arc<dyn Storage>) {
    let r = repo("docker.io/team/a");
    let claimed = Digest::sha256(b"the real bytes");
    let calls = Arc::new(AtomicUsize::new(0));
    let source = source_of(Bytes::from_static(b"bytes the digest does not name"), calls);
    let flight = store
        .clone()
        .fetch_blob(r.clone(), claimed.clone(), Sharing::Any, source)
        .await
        .ok()
        .unwrap();
    assert!(
        drain(flight.body).await.is_err(),
        "the last byte never arrives"
    );
    assert_eq!(store.stat_blob(&r, &claimed).unwrap(), None);
    assert_eq!(store.total_bytes(), 0);
}

pub async fn collection_removes_what_nothing_references_and_keeps_kept_images(
    store: Arc<dyn Storage>,
) {
    let now = GcOptions {
        grace: Duration::ZERO,
        duty: 1.0,
        ..GcOptions::default()
    };
    let r = repo("docker.io/team/app");
    let (gone, gone_blobs) = push_image(&*store, &r, "old", "old").await;
    let (kept, kept_blobs) = push_image(&*store, &r, "new", "new").await;
    store
        .delete_manifest(&r, &"old".parse().unwrap())
        .await
        .unwrap();
    store
        .delete_manifest(&r, &Reference::Digest(gone.clone()))
        .await
        .unwrap();
    // Untagged but kept by the cluster: a root all the same.
    store
        .delete_manifest(&r, &"new".parse().unwrap())
        .await
        .unwrap();
    let image = format!("{r}@{kept}");
    assert_eq!(
        store
            .set_kept(&[KeptImage {
                image: image.clone(),
                pinned: false
            }])
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.kept().unwrap().len(), 1);
    let report = store.clone().collect(now.clone()).await.unwrap();
    assert_eq!(
        store.stat_blob(&r, &gone_blobs[1]).unwrap(),
        None,
        "{report:?}"
    );
    assert!(
        store.stat_blob(&r, &gone_blobs[0]).unwrap().is_some(),
        "the config both images share stays"
    );
    for b in &kept_blobs {
        assert!(store.stat_blob(&r, b).unwrap().is_some(), "{b}: {report:?}");
    }
    assert!(
        store
            .get_manifest(&r, &Reference::Digest(kept.clone()))
            .await
            .is_ok()
    );
    // Kept no more: collected.
    store.set_kept(&[]).await.unwrap();
    let report = store.clone().collect(now).await.unwrap();
    for b in &kept_blobs {
        assert_eq!(store.stat_blob(&r, b).unwrap(), None, "{b}");
    }
    assert_eq!(store.total_bytes(), 0, "{report:?}");
    store.flush_access().await.unwrap();
}

pub async fn stale_uploads_expire(store: Arc<dyn Storage>) {
    let r = repo("r");
    let s = store.start_upload(&r).await.unwrap();
    assert_eq!(
        store
            .expire_uploads(Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    assert!(store.upload_status(&r, &s.id).await.is_ok(), "young: kept");
    // Whole seconds: a session is old for a zero age once a second has passed.
    let started = unix_now();
    while unix_now() == started {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.expire_uploads(Duration::ZERO).await.unwrap(), 1);
    assert!(matches!(
        store.upload_status(&r, &s.id).await,
        Err(StoreError::UploadUnknown)
    ));
}

pub async fn what_is_served_is_remembered_once_flushed(store: Arc<dyn Storage>) {
    let r = repo("r");
    let d = put(&*store, &r, b"a layer").await;
    read_blob(&*store, &r, &d).await;
    assert_eq!(
        store.last_access(&d).unwrap(),
        None,
        "in memory until flushed"
    );
    assert!(store.flush_access().await.unwrap() >= 1);
    let at = store
        .last_access(&d)
        .unwrap()
        .expect("written by the flush");
    assert!(at <= unix_now() && at + 60 > unix_now(), "{at}");
}

pub async fn a_private_repository_s_blobs_are_never_linked_elsewhere_without_their_bytes(
    store: Arc<dyn Storage>,
) {
    let (private, public) = (
        repo("registry.example/team/app"),
        repo("docker.io/library/x"),
    );
    assert_eq!(
        store.visibility(&private).unwrap(),
        None,
        "unknown until set"
    );
    let before = put(
        &*store,
        &private,
        b"linked before it was known to be private",
    )
    .await;
    store
        .set_visibility(&private, Visibility::Private)
        .await
        .unwrap();
    assert_eq!(
        store.visibility(&private).unwrap(),
        Some(Visibility::Private)
    );
    let after = put(&*store, &private, b"pushed after").await;
    let (manifest, _) = push_image(&*store, &private, "v1", "private").await;
    // Public bytes a private repository links stay everyone's.
    let shared = put(&*store, &public, b"a public base layer").await;
    assert_eq!(
        store.mount_blob(&private, &shared, None).await.unwrap(),
        Some(19)
    );

    for d in [&before, &after, &manifest] {
        assert_eq!(
            store.mount_blob(&public, d, None).await.unwrap(),
            None,
            "{d} entered through a private repository"
        );
        assert_eq!(store.stat_blob(&public, d).unwrap(), None, "{d}");
    }
    let other = repo("docker.io/library/y");
    assert_eq!(
        store.mount_blob(&other, &shared, None).await.unwrap(),
        Some(19),
        "a mount scopes nothing"
    );
    // A write that names its source is the writer's choice (the internal listener's).
    assert!(
        store
            .mount_blob(&other, &before, Some(&private))
            .await
            .unwrap()
            .is_some()
    );
    // The bytes pushed (or fetched) through a public repository: they are everyone's now.
    put(&*store, &public, b"pushed after").await;
    assert_eq!(
        store
            .mount_blob(&repo("docker.io/library/z"), &after, None)
            .await
            .unwrap(),
        Some(12)
    );
    assert_eq!(
        read_blob(&*store, &private, &after).await,
        b"pushed after",
        "the private repository still reads its own"
    );
}

pub async fn grants_are_kept_per_repository_and_namespace(store: Arc<dyn Storage>) {
    let (a, b) = (repo("ghcr.io/team/a"), repo("ghcr.io/team/b"));
    let grant = |r: &RepoName, ns: &str, at: u64| Grant {
        repository: r.to_string(),
        namespace: ns.to_owned(),
        verified_at: at,
        expires_at: at + 86_400,
    };
    assert_eq!(store.grant(&a, "ns1").unwrap(), None);
    store.put_grant(&a, &grant(&a, "ns1", 100)).await.unwrap();
    store.put_grant(&a, &grant(&a, "ns2", 100)).await.unwrap();
    store.put_grant(&b, &grant(&b, "ns1", 100)).await.unwrap();
    // Renewed: the later check replaces the earlier.
    store.put_grant(&a, &grant(&a, "ns1", 200)).await.unwrap();
    assert_eq!(store.grant(&a, "ns1").unwrap(), Some(grant(&a, "ns1", 200)));
    assert_eq!(store.grant(&b, "ns2").unwrap(), None, "per repository");
    assert_eq!(
        store.grants().unwrap(),
        [
            grant(&a, "ns1", 200),
            grant(&a, "ns2", 100),
            grant(&b, "ns1", 100)
        ]
    );
    assert!(store.remove_grant(&a, "ns1").await.unwrap());
    assert!(!store.remove_grant(&a, "ns1").await.unwrap());
    assert_eq!(store.grant(&a, "ns1").unwrap(), None);
    assert_eq!(store.grant(&b, "ns1").unwrap(), Some(grant(&b, "ns1", 100)));
    // A repository whose name another's begins with holds none of its grants.
    let longer = repo("ghcr.io/team/a/b");
    assert_eq!(store.grant(&longer, "ns2").unwrap(), None);
}

pub async fn a_collection_forgets_who_may_read_a_repository_that_holds_nothing(
    store: Arc<dyn Storage>,
) {
    let now = GcOptions {
        grace: Duration::ZERO,
        duty: 1.0,
        ..GcOptions::default()
    };
    let (kept, emptied) = (repo("ghcr.io/team/kept"), repo("ghcr.io/team/emptied"));
    push_image(&*store, &kept, "v1", "kept").await;
    // A blob no manifest names: the collection removes it, and the repository holds nothing.
    put(&*store, &emptied, b"alone").await;
    for r in [&kept, &emptied] {
        store.set_visibility(r, Visibility::Private).await.unwrap();
    }
    let t = unix_now();
    let grant = |r: &RepoName, ns: &str, expires_at: u64| Grant {
        repository: r.to_string(),
        namespace: ns.to_owned(),
        verified_at: t - 10,
        expires_at,
    };
    let holding = grant(&kept, "ns1", t + 3600);
    for g in [
        holding.clone(),
        grant(&kept, "ns-old", t - 1),
        grant(&emptied, "ns1", t + 3600),
    ] {
        let r: RepoName = g.repository.parse().unwrap();
        store.put_grant(&r, &g).await.unwrap();
    }

    // A dry run forgets nothing; neither does a grace period the records are younger than.
    let dry = GcOptions {
        dry_run: true,
        ..now.clone()
    };
    let report = store.clone().collect(dry).await.unwrap();
    assert_eq!(report.forgotten_repositories + report.forgotten_grants, 0);
    let report = store.clone().collect(GcOptions::default()).await.unwrap();
    assert_eq!(report.forgotten_repositories + report.forgotten_grants, 0);
    assert_eq!(store.grants().unwrap().len(), 3);

    let report = store.clone().collect(now).await.unwrap();
    assert_eq!(report.removed_blobs, 1, "the lone blob");
    // Its link goes with it, though the repository held no manifest or tag.
    assert_eq!(store.repositories(None, 10).unwrap(), [kept.to_string()]);
    assert_eq!(report.forgotten_repositories, 1);
    assert_eq!(
        report.forgotten_grants, 2,
        "the emptied one's and the expired one"
    );
    assert_eq!(store.visibility(&emptied).unwrap(), None);
    assert_eq!(
        store.visibility(&kept).unwrap(),
        Some(Visibility::Private),
        "it holds an image"
    );
    assert_eq!(store.grants().unwrap(), [holding]);
}
