use std::collections::BTreeSet;

use bytes::Bytes;
use futures_util::StreamExt;
use kache_oci::{ParsedManifest, Reference, media_type};

use super::*;
use crate::{Limits, MinFree};

fn repo(s: &str) -> RepoName {
    s.parse().unwrap()
}

fn tag(t: &str) -> Reference {
    t.parse().unwrap()
}

/// A store with no space limits: what a collection removes must not depend on how full the
/// disk of the machine running the tests is (the tests of limits set their own).
fn open() -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    store.set_limits(Limits {
        max_size: None,
        min_free: MinFree::Bytes(0),
    });
    (dir, Arc::new(store))
}

fn now_gc() -> GcOptions {
    GcOptions {
        grace: Duration::ZERO,
        duty: 1.0,
        ..GcOptions::default()
    }
}

async fn blob(store: &Store, r: &RepoName, bytes: &[u8]) -> Digest {
    let d = Digest::sha256(bytes);
    let body = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::copy_from_slice(bytes))]);
    store.put_blob(r, &d, body).await.unwrap();
    d
}

fn descriptor(mt: &str, d: &Digest, size: usize) -> String {
    format!(r#"{{"mediaType":"{mt}","digest":"{d}","size":{size}}}"#)
}

/// Pushes an image of `layers` (each a distinct byte string) under `reference`; returns its
/// manifest digest and every blob digest it holds (config and layers).
async fn image(
    store: &Store,
    r: &RepoName,
    reference: &str,
    layers: &[&[u8]],
    extra: &str,
) -> (Digest, Vec<Digest>) {
    let config = format!(
        "{{\"architecture\":\"amd64\",\"os\":\"linux\",\"n\":{:?}}}",
        reference
    );
    let c = blob(store, r, config.as_bytes()).await;
    let mut blobs = vec![c.clone()];
    let mut ls = Vec::new();
    for l in layers {
        let d = blob(store, r, l).await;
        ls.push(descriptor(
            "application/vnd.oci.image.layer.v1.tar",
            &d,
            l.len(),
        ));
        blobs.push(d);
    }
    let m = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{},"layers":[{}]{extra}}}"#,
        media_type::OCI_MANIFEST,
        descriptor("application/vnd.oci.image.config.v1+json", &c, config.len()),
        ls.join(",")
    );
    let parsed = ParsedManifest::parse(m.as_bytes(), Some(media_type::OCI_MANIFEST)).unwrap();
    let d = store
        .put_manifest(r, &tag(reference), Bytes::from(m), &parsed)
        .await
        .unwrap();
    (d, blobs)
}

fn files(store: &Store) -> BTreeSet<Digest> {
    let mut out = BTreeSet::new();
    crate::recovery::for_each_blob_file(&store.layout, |d, _| {
        out.insert(d);
        Ok(())
    })
    .unwrap();
    out
}

async fn pulls(store: &Store, r: &RepoName, reference: &str) -> bool {
    let Ok(m) = store.get_manifest(r, &tag(reference)).await else {
        return false;
    };
    let parsed = ParsedManifest::parse(&m.bytes, Some(&m.media_type)).unwrap();
    for d in parsed.required_blobs() {
        if store.open_blob(r, &d.digest).await.is_err() {
            return false;
        }
    }
    true
}

#[tokio::test]
async fn deleting_a_tag_frees_exactly_the_blobs_only_it_held() {
    let (_dir, store) = open();
    let r = repo("team/app");
    let (a, a_blobs) = image(&store, &r, "a", &[b"shared", b"only-a"], "").await;
    let (_, b_blobs) = image(&store, &r, "b", &[b"shared", b"only-b"], "").await;
    let before = files(&store);

    let report = store.collect(now_gc()).await.unwrap();
    assert_eq!(report.removed_blobs, 0, "everything is tagged: {report:?}");
    assert_eq!(files(&store), before);

    store.delete_manifest(&r, &tag("a")).await.unwrap();
    let report = store.collect(now_gc()).await.unwrap();
    let gone: BTreeSet<Digest> = before.difference(&files(&store)).cloned().collect();
    let only_a: BTreeSet<Digest> = [a.clone(), a_blobs[0].clone(), a_blobs[2].clone()].into();
    assert_eq!(gone, only_a, "a's manifest, config and unique layer");
    assert_eq!(report.removed_blobs, 3);
    assert_eq!(report.removed_manifests, 1);
    assert!(pulls(&store, &r, "b").await);
    assert!(b_blobs.iter().all(|d| files(&store).contains(d)));
    assert_eq!(store.verify().await.unwrap().bad, Vec::<String>::new());
    assert_eq!(
        store.total_bytes(),
        files(&store)
            .iter()
            .map(|d| std::fs::metadata(store.blob_path(d)).unwrap().len())
            .sum::<u64>(),
        "the size gauge follows the sweep"
    );
}

#[tokio::test]
async fn the_grace_period_keeps_fresh_garbage() {
    let (_dir, store) = open();
    let r = repo("r");
    blob(&store, &r, b"uploaded, no manifest yet").await;
    image(&store, &r, "untagged-soon", &[b"l"], "").await;
    store
        .delete_manifest(&r, &tag("untagged-soon"))
        .await
        .unwrap();
    let before = files(&store);
    let report = store
        .collect(GcOptions {
            grace: Duration::from_secs(3600),
            ..GcOptions::default()
        })
        .await
        .unwrap();
    assert_eq!(report.removed_blobs, 0);
    assert_eq!(files(&store), before);
    let report = store.collect(now_gc()).await.unwrap();
    assert_eq!(report.removed_blobs, before.len() as u64);
    assert!(files(&store).is_empty());
}

#[tokio::test]
async fn an_index_marks_its_children_and_a_referrer_stays_with_its_subject() {
    let (_dir, store) = open();
    let r = repo("multi");
    // Two platform manifests pushed by digest, an index tagged over them.
    let (c1, c1_blobs) = image(&store, &r, "tmp1", &[b"amd64 layer"], "").await;
    let (c2, _) = image(&store, &r, "tmp2", &[b"arm64 layer"], "").await;
    for t in ["tmp1", "tmp2"] {
        store.delete_manifest(&r, &tag(t)).await.unwrap();
    }
    let idx = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{},{}]}}"#,
        media_type::OCI_INDEX,
        descriptor(media_type::OCI_MANIFEST, &c1, 0),
        descriptor(media_type::OCI_MANIFEST, &c2, 0),
    );
    let parsed = ParsedManifest::parse(idx.as_bytes(), Some(media_type::OCI_INDEX)).unwrap();
    let idx_digest = store
        .put_manifest(&r, &tag("v1"), Bytes::from(idx.clone()), &parsed)
        .await
        .unwrap();
    // A signature-like referrer of the index, pushed by digest only.
    let subject = format!(
        r#","subject":{}"#,
        descriptor(media_type::OCI_INDEX, &idx_digest, idx.len())
    );
    let (sig, sig_blobs) = image(&store, &r, "sig-tmp", &[b"signature"], &subject).await;
    store.delete_manifest(&r, &tag("sig-tmp")).await.unwrap();

    let report = store.collect(now_gc()).await.unwrap();
    assert_eq!(report.removed_blobs, 0, "{report:?}");
    let kept = files(&store);
    for d in [&c1, &c2, &sig, &c1_blobs[1], &sig_blobs[1]] {
        assert!(kept.contains(d), "{d} is reachable from the tag");
    }
    assert_eq!(store.referrers(&r, &idx_digest).unwrap().len(), 1);

    store.delete_manifest(&r, &tag("v1")).await.unwrap();
    store.collect(now_gc()).await.unwrap();
    assert!(files(&store).is_empty(), "nothing roots them any more");
    assert!(store.referrers(&r, &idx_digest).unwrap().is_empty());
}

#[tokio::test]
async fn kept_images_are_roots_and_unknown_references_are_refused() {
    let (_dir, store) = open();
    let r = repo("docker.io/library/app");
    let (m, _) = image(&store, &r, "1.0", &[b"app layer"], "").await;
    store.delete_manifest(&r, &tag("1.0")).await.unwrap();
    let by_digest = format!("docker.io/library/app@{m}");
    store
        .set_kept(&[KeptImage {
            image: by_digest.clone(),
            pinned: false,
        }])
        .await
        .unwrap();
    assert_eq!(store.kept().unwrap()[0].image, by_digest);
    assert_eq!(store.collect(now_gc()).await.unwrap().removed_blobs, 0);
    assert!(
        store
            .get_manifest(&r, &Reference::Digest(m.clone()))
            .await
            .is_ok()
    );

    let err = store
        .set_kept(&[KeptImage {
            image: "Not A Reference".into(),
            pinned: true,
        }])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Not A Reference"), "{err}");
    assert_eq!(
        store.kept().unwrap().len(),
        1,
        "a refused list changes nothing"
    );

    store.set_kept(&[]).await.unwrap();
    assert_eq!(store.collect(now_gc()).await.unwrap().removed_blobs, 3);
}

#[tokio::test]
async fn a_dry_run_reports_and_changes_nothing() {
    let (_dir, store) = open();
    let r = repo("r");
    image(&store, &r, "x", &[b"x layer"], "").await;
    store.delete_manifest(&r, &tag("x")).await.unwrap();
    let before = files(&store);
    let dry = store
        .collect(GcOptions {
            dry_run: true,
            ..now_gc()
        })
        .await
        .unwrap();
    assert!(dry.dry_run);
    assert_eq!(dry.removed_blobs, 3);
    assert_eq!(dry.removed_manifests, 1);
    assert_eq!(files(&store), before);
    let real = store.collect(now_gc()).await.unwrap();
    assert_eq!(
        (real.removed_blobs, real.removed_bytes),
        (dry.removed_blobs, dry.removed_bytes)
    );
}

#[tokio::test]
async fn one_collection_at_a_time() {
    let (_dir, store) = open();
    store.gate.begin().unwrap();
    assert!(matches!(
        store.collect(now_gc()).await,
        Err(StoreError::Busy)
    ));
    store.gate.end();
    store.collect(now_gc()).await.unwrap();
}

/// Sets the access time of a manifest as if it had last been pulled at `at`.
async fn pulled_at(store: &Store, d: &Digest, at: u64) {
    let index = store.index.clone();
    let d = d.clone();
    crate::blocking(move || index.record_access(&[(d, at)]))
        .await
        .unwrap();
}

#[tokio::test]
async fn over_the_cap_least_recently_pulled_images_go_first_and_pinned_ones_never() {
    let (_dir, store) = open();
    let r = repo("docker.io/library/app");
    let big = |c: u8| vec![c; 100_000];
    let (old, _) = image(&store, &r, "old", &[&big(1)], "").await;
    let (pinned, _) = image(&store, &r, "pinned", &[&big(2)], "").await;
    let (middle, _) = image(&store, &r, "middle", &[&big(3)], "").await;
    let (new, _) = image(&store, &r, "new", &[&big(4)], "").await;
    let t = crate::index::now();
    store.flush_access().await.unwrap();
    pulled_at(&store, &pinned, t - 4000).await;
    pulled_at(&store, &old, t - 3000).await;
    pulled_at(&store, &middle, t - 2000).await;
    pulled_at(&store, &new, t - 1000).await;
    store
        .set_kept(&[KeptImage {
            image: "docker.io/library/app:pinned".into(),
            pinned: true,
        }])
        .await
        .unwrap();

    // Room for a little more than two images: the oldest unpinned one must go.
    let total = store.total_bytes();
    store.set_limits(Limits {
        max_size: Some(total - 150_000),
        min_free: MinFree::Bytes(0),
    });
    let grace = GcOptions {
        grace: Duration::from_secs(60),
        ..GcOptions::default()
    };
    let report = store.collect(grace.clone()).await.unwrap();
    assert_eq!(
        report.evicted_images,
        ["docker.io/library/app:old", "docker.io/library/app:middle"]
    );
    assert_eq!(report.pressure.as_ref().unwrap().unmet_bytes, 0);
    assert!(store.total_bytes() <= total - 150_000);
    assert!(!pulls(&store, &r, "old").await);
    assert!(!pulls(&store, &r, "middle").await);
    assert!(pulls(&store, &r, "pinned").await);
    assert!(pulls(&store, &r, "new").await);

    // A cap nothing unpinned can meet: everything else goes, the pinned image stays.
    store.set_limits(Limits {
        max_size: Some(1),
        min_free: MinFree::Bytes(0),
    });
    let report = store.collect(grace).await.unwrap();
    assert_eq!(report.evicted_images, ["docker.io/library/app:new"]);
    assert!(report.pressure.unwrap().unmet_bytes > 0);
    assert!(pulls(&store, &r, "pinned").await);
    assert_eq!(store.verify().await.unwrap().bad, Vec::<String>::new());
}

#[tokio::test]
async fn the_free_space_floor_counts_like_the_cap() {
    let (_dir, store) = open();
    store.set_limits(Limits {
        max_size: None,
        min_free: MinFree::Percent(100.0),
    });
    let p = store.pressure().unwrap().expect("no disk is 100% free");
    assert_eq!(p.reason, "min-free");
    assert!(p.needed_bytes > 0);
    store.set_limits(Limits {
        max_size: None,
        min_free: MinFree::Bytes(0),
    });
    assert_eq!(store.pressure().unwrap(), None);
}

/// Pushes and pulls race collections: garbage from long ago is swept while clients push it
/// again as layers of new images. Every push succeeds, every image pushed pulls whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn collections_under_pushes_and_pulls_lose_nothing() {
    const CLIENTS: u8 = 8;
    const ROUNDS: usize = 20;
    let (_dir, store) = open();
    let old_layer = |c: u8, k: usize| format!("client {c} old layer {k}").into_bytes();
    for c in 0..CLIENTS {
        let r = repo(&format!("client/{c}"));
        for k in 0..ROUNDS {
            let t = format!("old{k}");
            image(&store, &r, &t, &[&[c, 0xAA], &old_layer(c, k)], "").await;
            store.delete_manifest(&r, &tag(&t)).await.unwrap();
        }
    }
    store.flush_access().await.unwrap();
    store.index.backdate_all(7200).unwrap();
    let garbage = files(&store).len() as u64;

    let opts = GcOptions {
        grace: Duration::from_secs(600),
        batch: 4,
        ..GcOptions::default()
    };
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let store = store.clone();
        clients.push(tokio::spawn(async move {
            let r = repo(&format!("client/{c}"));
            for k in 0..ROUNDS {
                // The shared layer and one old layer, both garbage a collection may be
                // sweeping right now, plus one of its own.
                let own = format!("client {c} new {k}");
                let t = format!("new{k}");
                image(
                    &store,
                    &r,
                    &t,
                    &[&[c, 0xAA], &old_layer(c, k), own.as_bytes()],
                    "",
                )
                .await;
                assert!(pulls(&store, &r, &t).await, "client {c} round {k}");
                tokio::task::yield_now().await;
            }
            r
        }));
    }
    let mut removed = 0;
    let mut kept_in_use = 0;
    while !clients.iter().all(|c| c.is_finished()) {
        let report = store.collect(opts.clone()).await.unwrap();
        removed += report.removed_blobs;
        kept_in_use += report.kept_in_use;
    }
    let report = store.collect(opts).await.unwrap();
    removed += report.removed_blobs;
    for c in clients {
        let r = c.await.unwrap();
        for k in 0..ROUNDS {
            assert!(pulls(&store, &r, &format!("new{k}")).await);
        }
    }
    // The old manifests and configs are garbage nobody brought back.
    assert!(
        removed >= garbage - 2 * u64::from(CLIENTS) * ROUNDS as u64,
        "{removed} of {garbage}"
    );
    assert_eq!(store.verify().await.unwrap().bad, Vec::<String>::new());
    eprintln!("removed {removed} blobs, {kept_in_use} candidates kept because they were in use");
}

#[tokio::test]
async fn a_blob_the_store_cannot_write_is_relayed_from_the_source_and_verified() {
    let (dir, store) = open();
    // A temp directory that is a file: every write of a fetched blob fails at once.
    std::fs::remove_dir(dir.path().join("tmp")).unwrap();
    std::fs::write(dir.path().join("tmp"), b"not a directory").unwrap();
    let bytes = Bytes::from(vec![7u8; 300_000]);
    let d = Digest::sha256(&bytes);
    let source = {
        let bytes = bytes.clone();
        move || {
            let bytes = bytes.clone();
            async move {
                let chunks: Vec<Result<Bytes, crate::FetchError>> = bytes
                    .chunks(64 * 1024)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                Ok(crate::Source {
                    size: Some(bytes.len() as u64),
                    body: Box::pin(futures_util::stream::iter(chunks)),
                })
            }
        }
    };
    let s = store.fetch_blob(&repo("r"), &d, source).await.unwrap();
    let mut got = Vec::new();
    let mut body = s.body;
    while let Some(c) = body.next().await {
        got.extend_from_slice(&c.unwrap());
    }
    assert_eq!(got, bytes);
    assert_eq!(store.stat_blob(&repo("r"), &d).unwrap(), None, "not kept");

    // A source that lies is still caught on that path.
    let lying = move || async move {
        Ok(crate::Source {
            size: None,
            body: Box::pin(futures_util::stream::iter([Ok(Bytes::from_static(
                b"lies",
            ))])),
        })
    };
    let s = store.fetch_blob(&repo("r"), &d, lying).await.unwrap();
    let items: Vec<std::io::Result<Bytes>> = s.body.collect().await;
    assert!(
        items.last().unwrap().is_err(),
        "no verified end for wrong bytes"
    );
    assert!(
        items
            .iter()
            .filter_map(|i| i.as_ref().ok())
            .all(|b| b.len() < 4)
    );
}

#[test]
fn a_paced_collection_rests_in_proportion_to_its_work() {
    let quarter = Pace::new(0.25);
    assert_eq!(
        quarter.rest_after(Duration::from_millis(10)),
        Duration::from_millis(30)
    );
    assert_eq!(
        Pace::new(1.0).rest_after(Duration::from_millis(10)),
        Duration::ZERO
    );
    // Working through a few slices takes at least the work and its rests.
    let mut pace = Pace::new(0.5);
    let started = std::time::Instant::now();
    let mut worked = Duration::ZERO;
    while worked < Duration::from_millis(20) {
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_millis(1) {}
        worked += t.elapsed();
        pace.tick();
    }
    assert!(
        started.elapsed() >= Duration::from_millis(35),
        "{:?}",
        started.elapsed()
    );
}
