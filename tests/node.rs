//! kache as users run it, on a real node (scripts/kube-test-node: kubelet, containerd's CRI,
//! runc) of the current Kubernetes: the registry, the webhook and the controller as pods from the
//! kache image, the proxy as a hostNetwork DaemonSet on 127.0.0.1:7439, and upstream registries
//! (CNCF distribution, and one that drips a layer slowly) named by this machine's name, never
//! loopback, so that the webhook rewrites their images. Then, in one sequence (one node per
//! machine):
//!
//! - a Deployment's pod is rewritten, pulled by the kubelet through the proxy and the registry,
//!   runs, and its CachedImage is Cached;
//! - a pod labelled `kache.io/image-caching-policy: ignore` pulls straight from the upstream;
//! - with the registry stopped, the proxy falls back to the upstream and a new pod starts;
//! - the proxy killed in the middle of a pull: the kubelet retries and the pod starts;
//! - a private image and a pod's `imagePullSecrets` (private-image scoping on): the kubelet's
//!   pull through the proxy is refused until the controller has cached the image with the pod's
//!   secret, written the namespace's `kache-pull` token Secret (which the webhook named in the
//!   pod) and had the registry grant the namespace; the kubelet's next try then starts the pod
//!   from the cache, with no manual step. A pod of another namespace without the secret is
//!   refused by kache with 401 (also with the upstream stopped), and starts once it has a valid
//!   secret of its own;
//! - the upstream stopped and the node's copy of the image removed, content included: a new pod
//!   still starts, every byte from kache;
//! - a NodeImageSet of 20 images (built from scratch: no shell, no program; one private, read
//!   with a pull secret only the controller sees): all 20 reach the node's CRI by digest, the
//!   set is Ready 1/1, its holder pods (5 lanes) charge under 16 MiB together; they survive the kubelet's
//!   image garbage collection; a tag moved upstream reaches the node at the set's refresh; with
//!   the upstreams stopped and the node's copies removed, a new holder pod gets them all again
//!   from kache; deleting the set removes its DaemonSet.

use kache_testkit as support;

use std::path::Path;
use std::time::{Duration, Instant};

use kache_api::cached_image_name;
use serde_json::{Value, json};
use support::containerd::skip_unless_root;
use support::kube::{KubeServer, Version, non_loopback_name, pull_secret};
use support::metrics;
use support::node::{KacheOnNode, KubeNode, build_kache_image, pod_events};
use support::pull::Scratch;
use support::{
    Content, Distribution, DistributionKind, Fault, FaultyUpstream, Flavor, Image, ImageBuilder,
};

/// The kache image, as the node knows it (imported, never pulled).
const KACHE_IMAGE: &str = "test.invalid/kache:e2e";
/// kache's namespace.
const NS: &str = "kache";
/// The workloads' namespace.
const APPS: &str = "apps";
/// Long enough for a pull on a slow machine; every wait ends as soon as its condition holds.
const WAIT: Duration = Duration::from_secs(180);

/// A runnable image: the node's pause program as its entrypoint (it runs until killed), and a
/// layer of `size` bytes of its own.
fn runnable(pause: &[u8], seed: u64, size: usize) -> Image {
    ImageBuilder::new(Flavor::Oci)
        .program("pause", pause.to_vec())
        .random_layer(seed, &[size / 2, size - size / 2])
        .build()
}

fn app_pod(name: &str, image: &str, labels: Value, secrets: &[&str]) -> Value {
    let mut labels = labels;
    labels["app"] = json!(name);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "imagePullSecrets": secrets.iter().map(|s| json!({"name": s})).collect::<Vec<_>>(),
            "containers": [{"name": "app", "image": image, "imagePullPolicy": "IfNotPresent"}],
        },
    })
}

/// Creates a pod in APPS; returns it as admitted (the webhook's rewrite included).
fn create_pod(kube: &KubeServer, pod: &Value) -> Value {
    kube.ok(
        "POST",
        &format!("/api/v1/namespaces/{APPS}/pods"),
        Some(pod),
    )
}

fn delete_pod(kube: &KubeServer, ns: &str, name: &str) {
    kube.ok(
        "DELETE",
        &format!("/api/v1/namespaces/{ns}/pods/{name}?gracePeriodSeconds=0"),
        None,
    );
    kube.wait_for(
        &format!("/api/v1/namespaces/{ns}/pods/{name}"),
        WAIT,
        |code, _| (code == 404).then_some(()),
    );
}

/// The names of the holder pods of the set `held`, in kache's namespace.
fn holder_pods(kube: &KubeServer) -> Vec<String> {
    let pods = kube.ok(
        "GET",
        &format!("/api/v1/namespaces/{NS}/pods?labelSelector=kache.io/node-image-set=held"),
        None,
    );
    pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

fn scale(kube: &KubeServer, name: &str, replicas: u32) {
    kube.ok(
        "PATCH",
        &format!("/apis/apps/v1/namespaces/{NS}/deployments/kache-{name}"),
        Some(&json!({"spec": {"replicas": replicas}})),
    );
}

/// Polls until `addr` refuses connections (the pod behind it is gone).
fn wait_closed(addr: &str) {
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(addr).is_ok() {
        assert!(Instant::now() < deadline, "{addr} still listens");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn scrape(addr: &str) -> String {
    metrics::scrape(&format!("http://{addr}/metrics"))
}

fn proxy_requests(kache: &KacheOnNode, upstream: &str, result: &str) -> f64 {
    metrics::value(
        &scrape(&kache.proxy_metrics),
        "kache_proxy_requests_total",
        &[("upstream", upstream), ("result", result)],
    )
}

fn wait_cached(kube: &KubeServer, image: &str, digest: &str) {
    let path = format!(
        "/apis/kache.io/v1alpha1/cachedimages/{}",
        cached_image_name(image)
    );
    kube.wait_for(&path, WAIT, |code, v| {
        (code == 200 && v["status"]["phase"] == "Cached" && v["status"]["digest"] == digest)
            .then_some(())
    });
}

#[test]
fn pods_pull_through_kache_on_a_real_node_and_start_without_the_upstream() {
    if skip_unless_root("pods_pull_through_kache_on_a_real_node_and_start_without_the_upstream") {
        return;
    }
    let kube = KubeServer::start(Version::Current);
    let node = KubeNode::start(&kube);
    let s = Scratch::new("kache-e2e-node");

    // The kache image, imported as a node gets an image no registry serves.
    let image_dir = s.path("image");
    build_kache_image(
        Path::new(env!("CARGO_BIN_EXE_kache")),
        &image_dir,
        Some(KACHE_IMAGE),
    );
    node.import(&image_dir.join("kache-image.tar"));

    // The upstreams and their images.
    let pause = std::fs::read(kube.bin.join("pause")).expect("the release's pause program");
    let mut upstream = Distribution::start(DistributionKind::Open);
    let host = non_loopback_name(&upstream.host());
    let (app, plain, other) = (
        runnable(&pause, 1, 3 << 20),
        runnable(&pause, 2, 1 << 20),
        runnable(&pause, 3, 1 << 20),
    );
    let password = "node-pw-5d1e";
    let mut private = Distribution::start(DistributionKind::htpasswd("puller", password));
    let private_host = non_loopback_name(&private.host());
    let secret = runnable(&pause, 4, 1 << 20);
    let src = s.layout(
        "src",
        &[
            ("app", &app),
            ("plain", &plain),
            ("other", &other),
            ("secret", &secret),
        ],
    );
    for (tag, repo) in [
        ("app", "e2e/app:v1"),
        ("plain", "e2e/plain:v1"),
        ("other", "e2e/other:v1"),
    ] {
        s.skopeo.copy(
            &format!("{src}:{tag}"),
            &format!("docker://{host}/{repo}"),
            &[],
        );
    }
    s.skopeo.copy(
        &format!("{src}:secret"),
        &format!("docker://{private_host}/e2e/secret:v1"),
        &["--dest-creds", &format!("puller:{password}")],
    );
    // A big layer that drips out slowly, so that a pull is surely in progress when the proxy dies.
    let big = runnable(&pause, 5, 24 << 20);
    let slow = FaultyUpstream::start("e2e/slow", "v1", &big);
    let slow_host = non_loopback_name(&slow.host());

    let kache = KacheOnNode::new(
        KACHE_IMAGE,
        &s.path("registry-data"),
        &[&host, &private_host, &slow_host],
    );
    node.deploy_kache(&kube, &kache, &s.path("webhook-certs"));
    kube.namespace(APPS);

    // 1. A Deployment's pod: rewritten, pulled through the proxy and the registry, running, and
    // its CachedImage Cached.
    let app_image = format!("{host}/e2e/app:v1");
    let first = kube.deployment(APPS, "app", &app_image, WAIT);
    let app_pod_name = first["metadata"]["name"].as_str().unwrap().to_owned();
    let rewritten = first["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        rewritten.starts_with("localhost:7439/") && rewritten.ends_with("/e2e/app:v1"),
        "{rewritten}"
    );
    node.wait_running(&kube, APPS, &app_pod_name, WAIT);
    assert!(
        proxy_requests(&kache, &host, "miss") + proxy_requests(&kache, &host, "hit") > 0.0,
        "{}",
        scrape(&kache.proxy_metrics)
    );
    // The registry served every blob of the image (the controller may have cached it before
    // the kubelet asked, so whether that was a miss or a hit is a race).
    let registry_metrics = scrape(&kache.registry_metrics);
    assert!(
        metrics::value(
            &registry_metrics,
            "kache_registry_requests_total",
            &[("route", "blob"), ("method", "GET"), ("status", "200")]
        ) >= (app.blobs().len() - 1) as f64,
        "{registry_metrics}"
    );
    assert!(upstream.count_requests("GET", "/v2/e2e/app/blobs/") > 0);
    wait_cached(&kube, &app_image, app.digest());
    // The node holds the image under its rewritten name only.
    let prefix = rewritten.rsplit_once(':').unwrap().0.to_owned();
    assert!(
        node.images().iter().any(|i| i.starts_with(&prefix)),
        "{:?}",
        node.images()
    );

    // A NodeImageSet of 20 images: 19 public, one private. Each is only a layer of random bytes
    // (no shell, no program, no /etc/passwd), as an image built FROM scratch.
    let held: Vec<Image> = (0..20)
        .map(|i| {
            ImageBuilder::new(Flavor::Oci)
                .random_layer(100 + i, &[64 << 10])
                .build()
        })
        .collect();
    let tags: Vec<String> = (0..held.len()).map(|i| format!("h{i}")).collect();
    let tagged: Vec<(&str, &dyn Content)> = tags
        .iter()
        .zip(&held)
        .map(|(t, im)| (t.as_str(), im as &dyn Content))
        .collect();
    let held_src = s.layout("held", &tagged);
    let mut set_images = Vec::new();
    for i in 0..20 {
        let (target, creds) = if i == 19 {
            (
                format!("{private_host}/e2e/held-private:v1"),
                format!("puller:{password}"),
            )
        } else {
            (format!("{host}/e2e/held-{i}:v1"), String::new())
        };
        let args: Vec<&str> = if creds.is_empty() {
            vec![]
        } else {
            vec!["--dest-creds", &creds]
        };
        s.skopeo.copy(
            &format!("{held_src}:h{i}"),
            &format!("docker://{target}"),
            &args,
        );
        set_images.push(target);
    }
    kube.ok(
        "POST",
        &format!("/api/v1/namespaces/{APPS}/secrets"),
        Some(&pull_secret(
            "held-creds",
            &private_host,
            "puller",
            password,
        )),
    );
    kube.ok(
        "POST",
        "/apis/kache.io/v1alpha1/nodeimagesets",
        Some(&json!({
            "apiVersion": "kache.io/v1alpha1", "kind": "NodeImageSet",
            "metadata": {"name": "held"},
            "spec": {
                "images": set_images,
                "pullSecrets": [{"namespace": APPS, "name": "held-creds"}],
                "refresh": "1m",
            },
        })),
    );
    let held_ready = || {
        kube.wait_for(
            "/apis/kache.io/v1alpha1/nodeimagesets/held",
            WAIT,
            |_, v| {
                let st = &v["status"];
                (st["conditions"][0]["status"] == "True" && st["readyNodes"] == 1)
                    .then(|| v.clone())
            },
        )
    };
    let set = held_ready();
    assert_eq!(set["status"]["desiredNodes"], 1, "{set}");
    assert_eq!(set["status"]["imageCount"], 20, "{set}");
    let on_node = |im: &Image, repo: &str| format!("localhost:7439/{}@{}", repo, im.digest());
    let mut held_refs: Vec<String> = held
        .iter()
        .enumerate()
        .map(|(i, im)| {
            if i == 19 {
                on_node(
                    im,
                    &support::pull::cache_repo(&private_host, "e2e/held-private"),
                )
            } else {
                on_node(
                    im,
                    &support::pull::cache_repo(&host, &format!("e2e/held-{i}")),
                )
            }
        })
        .collect();
    let cri = node.cri_image_digests();
    for r in &held_refs {
        assert!(cri.contains(r), "{r} is not in the CRI's images: {cri:?}");
    }
    // The holder pods (one per lane: 20 images make 5) each hold one small container, whatever
    // the number of images.
    let holders = holder_pods(&kube);
    assert_eq!(holders.len(), 5, "{holders:?}");
    let memory: u64 = holders.iter().map(|h| node.pod_memory(h, "hold")).sum();
    assert!(memory < 16 << 20, "the holder pods charge {memory} bytes");

    // The kubelet's image garbage collection, as on a node whose disk fills up: an image no
    // container uses goes (pulled for the purpose: its going shows the collection ran), the
    // set's images stay.
    let unused = format!(
        "localhost:7439/{}:v1",
        support::pull::cache_repo(&host, "e2e/plain")
    );
    node.pull(&unused);
    assert!(node.images().contains(&unused), "{:?}", node.images());
    node.restart_kubelet(true);
    // The collection runs as the kubelet starts, or 5 minutes later if its stats were not ready.
    let deadline = Instant::now() + Duration::from_secs(420);
    while node.images().contains(&unused) {
        assert!(
            Instant::now() < deadline,
            "the kubelet never collected images"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    node.restart_kubelet(false);
    let cri = node.cri_image_digests();
    for r in &held_refs {
        assert!(cri.contains(r), "{r} was collected: {cri:?}");
    }

    // A tag moved upstream: the set's refresh (1m) resolves it again, and the holder pod rolls
    // out with the new digest.
    let moved = ImageBuilder::new(Flavor::Oci)
        .random_layer(200, &[64 << 10])
        .build();
    let moved_src = s.layout("moved", &[("m", &moved)]);
    s.skopeo.copy(
        &format!("{moved_src}:m"),
        &format!("docker://{}", set_images[0]),
        &[],
    );
    held_refs[0] = on_node(&moved, &support::pull::cache_repo(&host, "e2e/held-0"));
    kube.wait_for(
        "/apis/kache.io/v1alpha1/nodeimagesets/held",
        Duration::from_secs(240),
        |_, v| {
            let st = &v["status"];
            let digest = st["images"]
                .as_array()?
                .iter()
                .find(|i| i["image"] == set_images[0].as_str())?["digest"]
                .clone();
            (digest == moved.digest()
                && st["conditions"][0]["status"] == "True"
                && st["readyNodes"] == 1)
                .then_some(())
        },
    );
    let cri = node.cri_image_digests();
    assert!(cri.contains(&held_refs[0]), "{cri:?}");

    // 2. An ignored pod pulls straight from the upstream (containerd speaks plain HTTP to it).
    support::containerd::write_hosts_toml(
        &node.hosts_dir(),
        &host,
        &format!("http://{host}"),
        &format!("http://{host}"),
    );
    let before = scrape(&kache.proxy_metrics);
    let ignored = create_pod(
        &kube,
        &app_pod(
            "ignored",
            &format!("{host}/e2e/plain:v1"),
            json!({"kache.io/image-caching-policy": "ignore"}),
            &[],
        ),
    );
    assert_eq!(
        ignored["spec"]["containers"][0]["image"],
        format!("{host}/e2e/plain:v1")
    );
    node.wait_running(&kube, APPS, "ignored", WAIT);
    assert!(upstream.count_requests("GET", "/v2/e2e/plain/manifests/") > 0);
    assert_eq!(
        metrics::value(&before, "kache_proxy_requests_total", &[]),
        metrics::value(
            &scrape(&kache.proxy_metrics),
            "kache_proxy_requests_total",
            &[]
        ),
        "the proxy saw the ignored pod's pull"
    );

    // 3. The registry stops: the proxy falls back to the upstream, and a new pod starts.
    scale(&kube, "registry", 0);
    wait_closed(&kache.registry);
    let fallbacks = proxy_requests(&kache, &host, "fallback");
    create_pod(
        &kube,
        &app_pod("fallback", &format!("{host}/e2e/other:v1"), json!({}), &[]),
    );
    node.wait_running(&kube, APPS, "fallback", WAIT);
    assert!(proxy_requests(&kache, &host, "fallback") > fallbacks);
    scale(&kube, "registry", 1);
    node.wait_ready(&kube, "deployments", "kache-registry");

    // 4. The proxy dies in the middle of a pull: the pull is taken up again through the new
    // proxy (containerd re-requests a cut blob, the kubelet retries a failed pull), and the pod
    // starts.
    let layer = big.layers.last().unwrap().digest.clone();
    slow.fail(
        &layer,
        Fault::SlowDrip {
            chunk: 128 << 10,
            every: Duration::from_millis(100),
        },
    );
    create_pod(
        &kube,
        &app_pod("slow", &format!("{slow_host}/e2e/slow:v1"), json!({}), &[]),
    );
    let deadline = Instant::now() + WAIT;
    while slow.count_requests("GET", &layer) == 0 {
        assert!(
            Instant::now() < deadline,
            "the big layer was never asked for"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let proxy_pod = kube.ok(
        "GET",
        &format!("/api/v1/namespaces/{NS}/pods?labelSelector=app%3Dkache-proxy"),
        None,
    )["items"][0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    delete_pod(&kube, NS, &proxy_pod);
    let pulled = |kube: &KubeServer| {
        pod_events(kube, APPS, "slow")
            .iter()
            .any(|(reason, _)| reason == "Pulled")
    };
    assert!(
        !pulled(&kube),
        "the pull ended before the proxy died: {:?}",
        pod_events(&kube, APPS, "slow")
    );
    slow.clear_all();
    node.wait_ready(&kube, "daemonsets", "kache-proxy");
    let running = node.wait_running(&kube, APPS, "slow", WAIT);
    assert_eq!(running["status"]["containerStatuses"][0]["restartCount"], 0);
    // The new proxy (its counters start at zero) served the rest of the pull.
    let after_restart: f64 = ["hit", "miss", "stale", "fallback"]
        .iter()
        .map(|r| proxy_requests(&kache, &slow_host, r))
        .sum();
    assert!(
        after_restart > 0.0,
        "{}\n{:?}",
        scrape(&kache.proxy_metrics),
        pod_events(&kube, APPS, "slow")
    );
    eprintln!(
        "the slow pod's events, the proxy killed mid-pull: {:?}",
        pod_events(&kube, APPS, "slow")
    );

    // 5. A private image and a pod's pull secret. The kubelet has credentials for the upstream,
    // not for `localhost:7439`, so it pulls through the proxy anonymously, and the upstream
    // refuses that; the controller caches the image with the pod's secret (usually before the
    // kubelet even asks), and the kubelet's next try gets it from the cache. With the
    // controller stopped, the refusal shows first, then the pod starts by itself once the
    // controller is back.
    kube.ok(
        "POST",
        &format!("/api/v1/namespaces/{APPS}/secrets"),
        Some(&pull_secret("creds", &private_host, "puller", password)),
    );
    scale(&kube, "controller", 0);
    wait_closed(&kache.controller_metrics);
    let secret_image = format!("{private_host}/e2e/secret:v1");
    create_pod(
        &kube,
        &app_pod("private", &secret_image, json!({}), &["creds"]),
    );
    let refused = kube.wait_for(
        &format!("/api/v1/namespaces/{APPS}/pods/private"),
        WAIT,
        |_, _| {
            pod_events(&kube, APPS, "private")
                .into_iter()
                .find(|(reason, message)| {
                    reason == "Failed" && message.starts_with("Failed to pull image")
                })
        },
    );
    eprintln!("the private image, before the controller cached it: {refused:?}");
    assert!(
        refused.1.contains("401") || refused.1.to_lowercase().contains("unauthorized"),
        "{refused:?}"
    );
    scale(&kube, "controller", 1);
    wait_cached(&kube, &secret_image, secret.digest());
    node.wait_running(&kube, APPS, "private", WAIT);
    let admitted = kube.ok(
        "GET",
        &format!("/api/v1/namespaces/{APPS}/pods/private"),
        None,
    );
    assert_eq!(
        admitted["spec"]["imagePullSecrets"],
        json!([{"name": "creds"}, {"name": "kache-pull"}]),
        "the webhook adds the namespace's pull-token Secret"
    );

    // 5b. The private image stays the namespaces' that may pull it upstream. A pod of another
    // namespace with no secret (pulling again, as AlwaysPullImages makes it: the node holds the
    // image) is refused by kache with 401; with a valid secret of its own it starts; and with
    // the upstream gone, a namespace never granted is still refused.
    let always = |name: &str, secrets: &[&str]| {
        let mut p = app_pod(name, &secret_image, json!({}), secrets);
        p["spec"]["containers"][0]["imagePullPolicy"] = json!("Always");
        p
    };
    let refused_in = |ns: &str, name: &str| {
        kube.namespace(ns);
        kube.ok(
            "POST",
            &format!("/api/v1/namespaces/{ns}/pods"),
            Some(&always(name, &[])),
        );
        let (_, message) = kube.wait_for(
            &format!("/api/v1/namespaces/{ns}/pods/{name}"),
            WAIT,
            |_, _| {
                pod_events(&kube, ns, name)
                    .into_iter()
                    .find(|(reason, message)| {
                        reason == "Failed" && message.starts_with("Failed to pull image")
                    })
            },
        );
        assert!(
            (message.contains("401") || message.to_lowercase().contains("unauthorized"))
                && message.contains("localhost:7439"),
            "{ns}/{name}: {message}"
        );
        let (_, pod) = kube.request("GET", &format!("/api/v1/namespaces/{ns}/pods/{name}"), None);
        assert_ne!(pod["status"]["phase"], "Running", "{ns}/{name}");
    };
    refused_in("others", "refused");
    kube.ok(
        "POST",
        "/api/v1/namespaces/others/secrets",
        Some(&pull_secret("creds", &private_host, "puller", password)),
    );
    kube.ok(
        "POST",
        "/api/v1/namespaces/others/pods",
        Some(&always("granted", &["creds"])),
    );
    node.wait_running(&kube, "others", "granted", WAIT);
    private.stop();
    refused_in("strangers", "refused");
    for (ns, name) in [
        ("others", "refused"),
        ("others", "granted"),
        ("strangers", "refused"),
    ] {
        delete_pod(&kube, ns, name);
    }

    // 6. The upstream goes, and the node forgets the image, content included (every workload
    // goes, as the images share their program's layer): a new pod still starts, every byte from
    // kache.
    upstream.stop();
    kube.ok(
        "PATCH",
        &format!("/apis/apps/v1/namespaces/{APPS}/deployments/app"),
        Some(&json!({"spec": {"replicas": 0}})),
    );
    kube.ok(
        "DELETE",
        &format!("/api/v1/namespaces/{APPS}/pods?gracePeriodSeconds=0"),
        None,
    );
    kube.wait_for(&format!("/api/v1/namespaces/{APPS}/pods"), WAIT, |_, v| {
        v["items"].as_array()?.is_empty().then_some(())
    });
    node.forget("localhost:7439/");
    node.forget(&format!("{host}/"));
    for blob in app.blobs() {
        assert!(
            !node.has_content(&blob.digest),
            "the node still holds {}: {:?}",
            blob.digest,
            node.images()
        );
    }
    let hits = proxy_requests(&kache, &host, "hit");
    let sent = || {
        metrics::value(
            &scrape(&kache.proxy_metrics),
            "kache_proxy_sent_bytes_total",
            &[],
        )
    };
    let sent_before = sent();
    create_pod(&kube, &app_pod("offline", &app_image, json!({}), &[]));
    let offline = node.wait_running(&kube, APPS, "offline", WAIT);
    assert_eq!(
        offline["spec"]["containers"][0]["image"].as_str(),
        Some(rewritten.as_str())
    );
    assert!(proxy_requests(&kache, &host, "hit") > hits);
    // Every layer came through the proxy again: the node kept nothing of it.
    let layers: usize = app.layers.iter().map(|l| l.bytes.len()).sum();
    assert!(
        sent() - sent_before >= layers as f64,
        "the proxy sent {} bytes, the layers are {layers}",
        sent() - sent_before
    );
    assert!(!upstream.is_running());

    // 7. Both upstreams are gone and the node forgot the set's images (step 6): new holder pods,
    // as on a new node, get every one of them from kache.
    assert!(!private.is_running());
    let gone = holder_pods(&kube);
    assert_eq!(gone.len(), 5, "{gone:?}");
    for r in &held_refs {
        assert!(
            !node.cri_image_digests().contains(r),
            "{r} still on the node"
        );
    }
    for pod in &gone {
        delete_pod(&kube, NS, pod);
    }
    kube.wait_for(
        &format!("/api/v1/namespaces/{NS}/pods?labelSelector=kache.io/node-image-set=held"),
        WAIT,
        |_, v| {
            let fresh_and_ready = v["items"]
                .as_array()?
                .iter()
                .filter(|p| {
                    !gone.iter().any(|g| p["metadata"]["name"] == g.as_str())
                        && p["status"]["conditions"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
                .count();
            (fresh_and_ready == gone.len()).then_some(())
        },
    );
    held_ready();
    let cri = node.cri_image_digests();
    for r in &held_refs {
        assert!(
            cri.contains(r),
            "{r} is not back in the CRI's images: {cri:?}"
        );
    }
    // Deleting the set removes its DaemonSets.
    kube.ok("DELETE", "/apis/kache.io/v1alpha1/nodeimagesets/held", None);
    kube.wait_for(
        &format!(
            "/apis/apps/v1/namespaces/{NS}/daemonsets?labelSelector=kache.io/node-image-set=held"
        ),
        WAIT,
        |_, v| v["items"].as_array()?.is_empty().then_some(()),
    );
}
