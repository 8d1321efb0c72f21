//! Garbage collection for real: `kache registry` processes collecting while skopeo and HTTP
//! clients push, pull and pull through from CNCF distribution; `kache gc`; SIGKILL in the middle
//! of a sweep; the size cap and the free-space floor, with a tmpfs as a small disk; the cron
//! schedule.

use kache_testkit as support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::containerd::skip_unless_root;
use support::gc::{Tmpfs, collect, kache_gc, pull, push};
use support::http::{get_streamed, request};
use support::image::{Content, Flavor, Image, ImageBuilder, random_bytes, sha256_digest};
use support::metrics;
use support::pull::{Scratch, assert_pulled, cache_repo};
use support::registry::{fsck, stored_blobs};
use support::{Distribution, DistributionKind, Fault, FaultyUpstream, KacheProxy, KacheRegistry};

/// An image of one layer per seed, each layer a file of `size` incompressible bytes.
fn image(seeds: &[u64], size: usize) -> Image {
    seeds
        .iter()
        .fold(ImageBuilder::new(Flavor::Oci), |b, &s| {
            b.layer(vec![(format!("file-{s}"), random_bytes(s, size))])
        })
        .build()
}

/// Polls `what` until it holds, for at most `within`.
fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pushes `n` blobs of `size` bytes that no manifest references, into `junk`.
fn push_garbage(base: &str, seed: u64, n: u64, size: usize) {
    for i in 0..n {
        let bytes = random_bytes(seed + i, size);
        let digest = sha256_digest(&bytes);
        let url = format!("{base}/v2/junk/blobs/uploads/?digest={digest}");
        let r = request("POST", &url, &[], &bytes);
        assert_eq!(r.status, 201, "{}", r.text());
    }
}

fn registry_metric(registry: &KacheRegistry, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics::value(&metrics::scrape(&registry.metrics_url()), name, labels)
}

#[test]
fn deleting_a_tag_and_collecting_frees_exactly_the_blobs_only_it_held() {
    let s = Scratch::new("kache-e2e-gc");
    let registry = KacheRegistry::start_with_internal(
        s.path("data"),
        &[
            "--gc-grace",
            "0s",
            "--gc-cpu",
            "100%",
            "--gc-schedule",
            "off",
        ],
    );
    let internal = registry.internal_url();
    // One layer in common.
    let a = image(&[1, 2], 50_000);
    let b = image(&[1, 3], 50_000);
    let src = s.layout("src", &[("a", &a), ("b", &b)]);
    let dest = |t: &str| {
        format!(
            "docker://{}/team/app:{t}",
            registry.internal_addr().unwrap()
        )
    };
    for t in ["a", "b"] {
        s.skopeo.copy(&format!("{src}:{t}"), &dest(t), &[]);
    }
    let before = stored_blobs(registry.data_dir());

    // A collection is a write: the read listener refuses it.
    let (ok, out) = kache_gc(&registry.base_url(), &[]);
    assert!(!ok, "{out}");
    assert!(out.contains("405") && out.contains("read-only"), "{out}");

    let (ok, out) = kache_gc(&internal, &["--dry-run"]);
    assert!(ok, "{out}");
    assert!(out.contains("would remove 0 blobs"), "{out}");

    let r = request(
        "DELETE",
        &format!("{internal}/v2/team/app/manifests/a"),
        &[],
        &[],
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let (ok, out) = kache_gc(&internal, &["--dry-run"]);
    assert!(ok, "{out}");
    assert!(out.contains("would remove 3 blobs (1 manifests)"), "{out}");
    assert_eq!(
        stored_blobs(registry.data_dir()),
        before,
        "a dry run removes nothing"
    );

    let (ok, out) = kache_gc(&internal, &["--json"]);
    assert!(ok, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
    let only_a = [&a.manifest, &a.config, &a.layers[1]];
    assert_eq!(report["removedBlobs"], 3);
    assert_eq!(report["removedManifests"], 1);
    assert_eq!(
        report["removedBytes"],
        only_a.iter().map(|b| b.size() as u64).sum::<u64>()
    );
    let after = stored_blobs(registry.data_dir());
    let gone: BTreeSet<&String> = before.keys().filter(|d| !after.contains_key(*d)).collect();
    let expected: BTreeSet<&String> = only_a.iter().map(|b| &b.digest).collect();
    assert_eq!(
        gone, expected,
        "a's manifest, config and own layer, nothing else"
    );

    let got = s.pull(&dest("b"), &[]);
    assert_pulled("b after a was collected", &b, &got);
    s.pull_fails(&dest("a"), &[]);

    let last = support::get(&format!("{internal}/kache/v1/gc"), &[]);
    assert_eq!(last.status, 200);
    assert_eq!(last.json()["removedBlobs"], 3, "the last report");
    let runs = |result| {
        registry_metric(
            &registry,
            "kache_registry_gc_runs_total",
            &[("result", result)],
        )
    };
    assert_eq!((runs("success"), runs("dry_run")), (1.0, 2.0));
    assert_eq!(
        registry_metric(&registry, "kache_registry_gc_freed_blobs_total", &[]),
        3.0
    );
}

/// 32 clients push, pull and pull through different images for a bounded time while
/// collections run back to back: no request fails, and afterwards every image is whole.
#[test]
fn collections_in_a_loop_under_32_clients_fail_no_request() {
    const PUSHERS: u64 = 12;
    const PULLERS: u64 = 10;
    const PULL_THROUGH: u64 = 10;
    const LOAD: Duration = Duration::from_secs(12);
    let s = Scratch::new("kache-e2e-gc-load");
    let upstream = Distribution::start(DistributionKind::Open);
    let host = upstream.host();
    let upstream_images: Vec<Image> = (0..PULL_THROUGH)
        .map(|i| image(&[500 + i, 600 + i], 200_000))
        .collect();
    for (i, img) in upstream_images.iter().enumerate() {
        let src = s.layout(&format!("up{i}"), &[("v1", img)]);
        s.skopeo.copy(
            &format!("{src}:v1"),
            &format!("docker://{host}/test/pt{i}:v1"),
            &[],
        );
    }
    let registry = KacheRegistry::start_with_internal(
        s.path("data"),
        &[
            "--insecure-registry",
            &host,
            "--gc-grace",
            "3s",
            "--gc-cpu",
            "100%",
            "--gc-schedule",
            "off",
        ],
    );
    let internal = registry.internal_url();
    let read = registry.base_url();
    let pulled_images: Vec<Image> = (0..PULLERS)
        .map(|i| image(&[700 + i, 800 + i], 150_000))
        .collect();
    for (i, img) in pulled_images.iter().enumerate() {
        push(&internal, &format!("load/fixed{i}"), "v1", img).unwrap();
    }

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let requests = Arc::new(AtomicU64::new(0));
    let fail = {
        let failures = failures.clone();
        move |e: String| failures.lock().unwrap().push(e)
    };
    let deadline = Instant::now() + LOAD;
    let mut clients = Vec::new();
    for c in 0..PUSHERS {
        let (internal, stop, fail, requests) = (
            internal.clone(),
            stop.clone(),
            fail.clone(),
            requests.clone(),
        );
        clients.push(std::thread::spawn(move || {
            let repo = format!("load/push{c}");
            // Layers of deleted rounds, with when they became garbage: once older than the
            // grace period a collection may be sweeping them as this client pushes them again.
            let mut deleted: Vec<(Instant, u64)> = Vec::new();
            let mut last: Option<(String, Image)> = None;
            let mut round = 0u64;
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                let own = 10_000 + c * 1000 + round;
                let mut seeds = vec![100 + c, own];
                if let Some(pos) = deleted
                    .iter()
                    .position(|(at, _)| at.elapsed() > Duration::from_secs(4))
                {
                    seeds.push(deleted.remove(pos).1);
                }
                let img = image(&seeds, 20_000);
                let tag = format!("r{round}");
                let result = push(&internal, &repo, &tag, &img)
                    .and_then(|()| pull(&internal, &repo, &tag, &img));
                requests.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = result {
                    fail(format!("pusher {c} round {round}: {e}"));
                    break;
                }
                if let Some((t, _)) = &last {
                    let r = request(
                        "DELETE",
                        &format!("{internal}/v2/{repo}/manifests/{t}"),
                        &[],
                        &[],
                    );
                    if r.status != 202 {
                        fail(format!("pusher {c}: DELETE {t}: {} {}", r.status, r.text()));
                    }
                    deleted.push((Instant::now(), own - 1));
                }
                last = Some((tag, img));
                round += 1;
            }
            (repo, last)
        }));
    }
    let mut readers = Vec::new();
    for (i, img) in pulled_images.iter().cloned().enumerate() {
        let (read, stop, fail, requests) =
            (read.clone(), stop.clone(), fail.clone(), requests.clone());
        readers.push(std::thread::spawn(move || {
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                requests.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = pull(&read, &format!("load/fixed{i}"), "v1", &img) {
                    fail(format!("puller {i}: {e}"));
                    break;
                }
            }
        }));
    }
    for (i, img) in upstream_images.iter().cloned().enumerate() {
        let (read, stop, fail, requests, host) = (
            read.clone(),
            stop.clone(),
            fail.clone(),
            requests.clone(),
            host.clone(),
        );
        readers.push(std::thread::spawn(move || {
            let repo = cache_repo(&host, &format!("test/pt{i}"));
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                requests.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = pull(&read, &repo, "v1", &img) {
                    fail(format!("pull-through client {i}: {e}"));
                    break;
                }
            }
        }));
    }
    let mut collections = 0;
    let mut removed = 0;
    let mut kept_in_use = 0;
    while Instant::now() < deadline && failures.lock().unwrap().is_empty() {
        let report = collect(&internal, false);
        collections += 1;
        removed += report["removedBlobs"].as_u64().unwrap();
        kept_in_use += report["keptInUse"].as_u64().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let pushed: Vec<(String, Option<(String, Image)>)> =
        clients.into_iter().map(|c| c.join().unwrap()).collect();
    for r in readers {
        r.join().unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    eprintln!(
        "{} client rounds, {collections} collections removed {removed} blobs, {kept_in_use} candidates kept as in use",
        requests.load(Ordering::Relaxed)
    );
    assert!(collections >= 3, "collections ran back to back");
    assert!(
        removed > 0,
        "the collections swept the garbage of deleted rounds"
    );

    // Afterwards every image is whole, on disk and through the API.
    let mut registry = registry;
    registry.stop();
    let report = fsck(registry.data_dir());
    assert!(report.success && report.bad == 0, "{}", report.output);
    registry.restart();
    for (repo, last) in &pushed {
        let (tag, img) = last.as_ref().expect("every pusher pushed");
        pull(&registry.internal_url(), repo, tag, img).unwrap();
    }
    for (i, img) in pulled_images.iter().enumerate() {
        pull(&registry.base_url(), &format!("load/fixed{i}"), "v1", img).unwrap();
    }
}

#[test]
fn a_large_blob_pulled_through_during_sweeps_is_served_whole_and_stays() {
    let big = ImageBuilder::new(Flavor::Oci)
        .layer(vec![("big".into(), random_bytes(42, 48 << 20))])
        .build();
    let layer = big.layers[0].clone();
    let upstream = FaultyUpstream::start("test/big", "v1", &big);
    // 48 chunks of 1 MiB, 40 ms apart: about two seconds of flight.
    upstream.fail(
        &layer.digest,
        Fault::SlowDrip {
            chunk: 1 << 20,
            every: Duration::from_millis(40),
        },
    );
    let s = Scratch::new("kache-e2e-gc-flight");
    let registry = KacheRegistry::start_with_internal(
        s.path("data"),
        &[
            "--insecure-registry",
            &upstream.host(),
            "--gc-grace",
            "0s",
            "--gc-cpu",
            "100%",
            "--gc-schedule",
            "off",
            "--gc-batch",
            "1",
        ],
    );
    let internal = registry.internal_url();
    // Garbage for the sweeps to remove one by one while the flight runs.
    push_garbage(&internal, 9000, 200, 1000);
    let repo = cache_repo(&upstream.host(), "test/big");
    let base = registry.base_url();
    let r = support::get(
        &format!("{base}/v2/{repo}/manifests/v1"),
        &[("Accept", big.manifest.media_type.as_str())],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let client = {
        let url = format!("{base}/v2/{repo}/blobs/{}", layer.digest);
        std::thread::spawn(move || get_streamed(&url, Duration::from_secs(120)).expect("GET"))
    };
    let mut sweeps = 0;
    let mut removed = 0;
    while !client.is_finished() {
        let report = collect(&internal, false);
        removed += report["removedBlobs"].as_u64().unwrap();
        sweeps += 1;
    }
    let got = client.join().unwrap();
    assert_eq!((got.status, got.error), (200, None));
    assert_eq!(got.size, layer.size() as u64);
    assert_eq!(got.digest, layer.digest, "served whole");
    assert!(
        sweeps >= 2 && removed > 0,
        "{sweeps} collections, {removed} removed during the flight"
    );
    eventually("the flight committed", Duration::from_secs(10), || {
        stored_blobs(registry.data_dir()).contains_key(&layer.digest)
    });
    collect(&internal, false);
    assert!(
        stored_blobs(registry.data_dir()).contains_key(&layer.digest),
        "a tagged image's blob stays"
    );
    let r = support::head(&format!("{base}/v2/{repo}/blobs/{}", layer.digest), &[]);
    assert_eq!(r.header("x-kache-cache"), Some("hit"));
}

#[test]
fn sigkill_in_the_middle_of_a_sweep_leaves_a_consistent_store() {
    const GARBAGE: u64 = 1500;
    let s = Scratch::new("kache-e2e-gc-kill");
    let mut registry = KacheRegistry::start_with_internal(
        s.path("data"),
        &[
            "--gc-grace",
            "0s",
            "--gc-cpu",
            "100%",
            "--gc-schedule",
            "off",
            "--gc-batch",
            "1",
        ],
    );
    let internal = registry.internal_url();
    let kept = image(&[77, 78], 100_000);
    let src = s.layout("src", &[("v1", &kept)]);
    let dest = format!(
        "docker://{}/team/kept:v1",
        registry.internal_addr().unwrap()
    );
    s.skopeo.copy(&format!("{src}:v1"), &dest, &[]);
    push_garbage(&internal, 5000, GARBAGE, 512);
    let all = stored_blobs(registry.data_dir()).len();

    // One blob per index commit: long enough to be killed in the middle.
    let gc = {
        let internal = internal.clone();
        std::thread::spawn(move || {
            let _ =
                support::http::try_request("POST", &format!("{internal}/kache/v1/gc"), &[], &[]);
        })
    };
    eventually("the sweep started", Duration::from_secs(60), || {
        stored_blobs(registry.data_dir()).len() + 20 <= all
    });
    registry.kill9();
    gc.join().unwrap();
    let left = stored_blobs(registry.data_dir()).len();
    assert!(
        left > kept.blobs().len() + 20,
        "killed in the middle: {left} of {all} blobs left"
    );

    // Restart: the store repairs itself, agrees with the disk, and serves every kept image.
    registry.restart();
    registry.stop();
    let report = fsck(registry.data_dir());
    assert!(report.success && report.bad == 0, "{}", report.output);
    assert_eq!(
        report.blobs as usize,
        stored_blobs(registry.data_dir()).len(),
        "the index names exactly the files on disk"
    );
    registry.restart();
    let got = s.pull(&dest, &[]);
    assert_pulled("the kept image after the kill", &kept, &got);
    // The next collection finishes the job.
    let report = collect(&registry.internal_url(), false);
    assert_eq!(
        report["removedBlobs"].as_u64().unwrap() as usize,
        left - kept.blobs().len()
    );
    assert_eq!(stored_blobs(registry.data_dir()).len(), kept.blobs().len());
}

/// Seeds distribution with one image per name, `test/<name>:v1`, of one layer of `size` bytes.
fn seeded_upstream(
    s: &Scratch,
    names: &[&str],
    size: usize,
) -> (Distribution, BTreeMap<String, Image>) {
    let upstream = Distribution::start(DistributionKind::Open);
    let mut images = BTreeMap::new();
    for (i, n) in names.iter().enumerate() {
        let img = image(&[3000 + i as u64], size);
        let src = s.layout(&format!("seed-{n}"), &[("v1", &img)]);
        s.skopeo.copy(
            &format!("{src}:v1"),
            &format!("docker://{}/test/{n}:v1", upstream.host()),
            &[],
        );
        images.insert(n.to_string(), img);
    }
    (upstream, images)
}

#[test]
fn over_the_cap_least_recently_pulled_images_go_first_and_pinned_ones_never() {
    let s = Scratch::new("kache-e2e-gc-cap");
    let (mut upstream, images) = seeded_upstream(&s, &["a", "b", "c", "d"], 1 << 20);
    let host = upstream.host();
    let cap = (2 << 20) + (600 << 10);
    let registry = KacheRegistry::start_with_internal(
        s.path("data"),
        &[
            "--insecure-registry",
            &host,
            "--max-size",
            &cap.to_string(),
            "--gc-cpu",
            "100%",
            "--gc-schedule",
            "off",
        ],
    );
    let (internal, base) = (registry.internal_url(), registry.base_url());
    let repo = |n: &str| cache_repo(&host, &format!("test/{n}"));
    // a is pinned (a CachedImage retains it), as the controller says it.
    let r = request(
        "PUT",
        &format!("{internal}/kache/v1/images"),
        &[("Content-Type", "application/json")],
        format!(r#"{{"images":[{{"image":"{host}/test/a:v1","pinned":true}}]}}"#).as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Pulled in this order, a second apart (access times are whole seconds): a, then c, then
    // b (so least recent is not alphabetical), then d. The cap holds two and a half.
    for n in ["a", "c", "b", "d"] {
        pull(&base, &repo(n), "v1", &images[n]).unwrap();
        if n != "d" {
            std::thread::sleep(Duration::from_millis(1100));
        }
    }
    // Over the cap after b (c goes: a is pinned), and again after d (b goes).
    eventually(
        "the store over its cap evicts",
        Duration::from_secs(30),
        || registry_metric(&registry, "kache_registry_gc_evicted_images_total", &[]) >= 2.0,
    );
    let logs = registry.logs();
    let evicted = |n: &str| logs.find(&format!("evicted=[\"{}:v1\"]", repo(n)));
    assert!(
        evicted("c") < evicted("b") && evicted("c").is_some(),
        "{logs}"
    );
    let last = support::get(&format!("{internal}/kache/v1/gc"), &[]).json();
    assert_eq!(last["pressure"]["reason"], "max-size", "{last}");
    assert_eq!(last["pressure"]["unmetBytes"], 0, "{last}");
    assert!(registry_metric(&registry, "kache_registry_store_bytes", &[]) <= cap as f64);

    upstream.stop();
    pull(&base, &repo("a"), "v1", &images["a"]).expect("the pinned image stays");
    pull(&base, &repo("d"), "v1", &images["d"]).expect("the most recent image stays");
    for n in ["b", "c"] {
        assert!(
            pull(&base, &repo(n), "v1", &images[n]).is_err(),
            "{n} was evicted"
        );
    }
}

#[test]
fn under_the_free_space_floor_images_are_evicted() {
    if skip_unless_root("under_the_free_space_floor_images_are_evicted") {
        return;
    }
    let s = Scratch::new("kache-e2e-gc-floor");
    let disk = Tmpfs::mount("24m");
    let (_upstream, images) = seeded_upstream(&s, &["p", "q", "r", "t"], 4 << 20);
    let host = _upstream.host();
    let registry = KacheRegistry::start_with_internal(
        disk.path().join("data"),
        &[
            "--insecure-registry",
            &host,
            "--min-free",
            "10MiB",
            "--gc-cpu",
            "100%",
            "--gc-schedule",
            "off",
        ],
    );
    let base = registry.base_url();
    for n in ["p", "q", "r", "t"] {
        pull(
            &base,
            &cache_repo(&host, &format!("test/{n}")),
            "v1",
            &images[n],
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(1100));
    }
    eventually("the floor evicts", Duration::from_secs(30), || {
        registry_metric(&registry, "kache_registry_gc_evicted_images_total", &[]) >= 1.0
    });
    let last = support::get(&format!("{}/kache/v1/gc", registry.internal_url()), &[]).json();
    assert_eq!(last["pressure"]["reason"], "min-free", "{last}");
    assert_eq!(
        last["evictedImages"][0],
        format!("{}:v1", cache_repo(&host, "test/p")),
        "the least recently pulled first"
    );
    let free = registry_metric(&registry, "kache_registry_store_free_bytes", &[]);
    assert!(free >= (10 << 20) as f64, "{free} bytes free");
}

/// A blob larger than the disk's free space is served whole to every client, through the
/// registry and through the proxy, announced (distribution) or not (chunked), and is not kept.
#[test]
fn a_blob_larger_than_the_free_space_is_served_whole_uncached() {
    if skip_unless_root("a_blob_larger_than_the_free_space_is_served_whole_uncached") {
        return;
    }
    let s = Scratch::new("kache-e2e-gc-full");
    let disk = Tmpfs::mount("16m");
    let big = ImageBuilder::new(Flavor::Oci)
        .layer(vec![("big".into(), random_bytes(4242, 40 << 20))])
        .build();
    let layer = big.layers[0].clone();
    let announced = Distribution::start(DistributionKind::Open);
    let src = s.layout("big", &[("v1", &big)]);
    s.skopeo.copy(
        &format!("{src}:v1"),
        &format!("docker://{}/test/big:v1", announced.host()),
        &[],
    );
    let chunked = FaultyUpstream::start("test/big", "v1", &big);
    chunked.fail(&layer.digest, Fault::Chunked);
    let registry = KacheRegistry::start_with_args(
        disk.path().join("data"),
        &[
            "--insecure-registry",
            &announced.host(),
            "--insecure-registry",
            &chunked.host(),
            "--min-free",
            "0",
            "--gc-cpu",
            "100%",
            "--gc-schedule",
            "off",
        ],
    );
    let proxy = KacheProxy::start(&registry.base_url(), &[] as &[&str]);
    for host in [announced.host(), chunked.host()] {
        let repo = cache_repo(&host, "test/big");
        let url = format!("{}/v2/{repo}/blobs/{}", registry.base_url(), layer.digest);
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                std::thread::spawn(move || {
                    let got = get_streamed(&url, Duration::from_secs(120)).expect("GET");
                    assert_eq!((got.status, got.error), (200, None), "{url}");
                    got.digest
                })
            })
            .collect();
        for c in clients {
            assert_eq!(
                c.join().unwrap(),
                layer.digest,
                "whole from {host}, via the registry"
            );
        }
        let got = s.pull(&format!("docker://{}/{repo}:v1", proxy.addr()), &[]);
        assert_pulled(&format!("from {host}, via the proxy"), &big, &got);
        assert!(!stored_blobs(registry.data_dir()).contains_key(&layer.digest));
    }
    assert!(registry_metric(&registry, "kache_registry_blobs_not_stored_total", &[]) >= 2.0);
    assert!(
        registry
            .logs()
            .contains("served from the upstream without caching it")
    );
    assert_nothing_half_written(registry.data_dir());

    // A push that cannot fit is refused with a clear error, with a length or without one, and
    // leaves nothing behind.
    drop((proxy, registry));
    let registry = KacheRegistry::start_with_internal(
        disk.path().join("data"),
        &[
            "--min-free",
            "0",
            "--gc-cpu",
            "100%",
            "--gc-schedule",
            "off",
        ],
    );
    let url = format!(
        "{}/v2/team/big/blobs/uploads/?digest={}",
        registry.internal_url(),
        layer.digest
    );
    for chunked in [false, true] {
        let (status, body) = support::http::post_unread(&url, &layer.bytes, chunked);
        assert_eq!(status, 507, "{body}");
        assert!(body.contains("storage is full"), "{body}");
    }
    assert_nothing_half_written(registry.data_dir());
    let head = support::head(
        &format!("{}/v2/team/big/blobs/{}", registry.base_url(), layer.digest),
        &[],
    );
    assert_eq!(head.status, 404);
}

/// No temporary file is left, and every blob file is whole.
fn assert_nothing_half_written(data: &std::path::Path) {
    let tmp: Vec<_> = std::fs::read_dir(data.join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "left in tmp/: {tmp:?}");
    stored_blobs(data);
}

#[test]
fn the_schedule_fires_and_a_bad_one_is_refused_at_start() {
    let s = Scratch::new("kache-e2e-gc-cron");
    // Six fields: every second (the seconds field is optional; five fields are minutes).
    let registry = KacheRegistry::start_with_internal(
        s.path("data"),
        &[
            "--gc-cpu",
            "100%",
            "--gc-schedule",
            "* * * * * *",
            "--gc-grace",
            "0s",
        ],
    );
    push_garbage(&registry.internal_url(), 1, 1, 100);
    eventually(
        "a scheduled collection ran",
        Duration::from_secs(10),
        || {
            registry_metric(
                &registry,
                "kache_registry_gc_runs_total",
                &[("result", "success")],
            ) >= 1.0
        },
    );
    eventually("it removed the garbage", Duration::from_secs(10), || {
        stored_blobs(registry.data_dir()).is_empty()
    });
    assert!(
        registry.logs().contains("why=\"schedule\"") || registry.logs().contains("why=schedule")
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kache"))
        .args([
            "registry",
            "--gc-cpu",
            "100%",
            "--gc-schedule",
            "61 * * * *",
            "--data-dir",
        ])
        .arg(s.path("never"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--gc-schedule") && err.contains("not a cron expression"),
        "{err}"
    );
    assert!(
        !s.path("never").exists(),
        "refused before touching anything"
    );
}
