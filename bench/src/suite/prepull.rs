//! The prepull step: a list of images put on a real node before any pod needs them (the test
//! bed's kubelet, containerd and runc), two ways side by side:
//!
//! - the image-puller's way: one DaemonSet pod with one long-running container per image, each
//!   pulled straight from the upstream by the kubelet;
//! - kache's: a NodeImageSet, whose holder pods (one per lane, 5 for 20 images) run each image
//!   as a short init container, pulled through the node proxy from the warm cache (the node
//!   forgot them first), and one `hold` container each.
//!
//! Measured: the time from the pods' creation until they are all Ready (every image present),
//! and the memory their cgroups charge once Ready. Needs root, as a node does.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};

use super::pod::{blocking, push_image, start_node};
use super::report::{ratio, secs};
use super::{Bench, MIB};

use kache_testkit::image::{Flavor, ImageBuilder};
use kache_testkit::kube::KubeServer;
use kache_testkit::node::KacheOnNode;
use kache_testkit::{image, kube};

const KACHE_IMAGE: &str = "bench.invalid/kache:bench";
/// Images in the list.
const IMAGES: usize = 20;
/// Bytes of each image's own layer.
const IMAGE_BYTES: usize = 2 * MIB as usize;
/// The holder pods of a set of `IMAGES` images: one per lane.
const LANES: usize = 5;
/// The longest the step waits for a pod.
const LIMIT: Duration = Duration::from_secs(600);
const NS: &str = "kache";

/// One way's measure.
#[derive(Debug, Clone, Copy)]
struct Held {
    ready: Duration,
    memory: u64,
}

pub(super) async fn prepull_step(bench: &mut Bench<'_>) -> Result<()> {
    let Bench {
        o,
        work,
        kache,
        urls,
        report,
        ..
    } = bench;
    if !o.wants("prepull") {
        return Ok(());
    }
    let _ = writeln!(
        report.md,
        "### Node pre-pull on a real node ({IMAGES} images of {} MiB)\n",
        IMAGE_BYTES / MIB as usize
    );
    if std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m))? != 0 {
        let _ = writeln!(report.md, "Skipped: a node needs root.\n");
        return Ok(());
    }
    let dir = work.join("prepull");
    std::fs::create_dir_all(&dir)?;
    eprintln!("prepull: starting a control plane and a node");
    let (kube, node, pause) = start_node(kache, &dir, KACHE_IMAGE).await?;

    // Each way has images of its own; each image is the pause program (so that the puller's
    // way can run it for ever) and a layer of its own.
    let upstream = urls.upstream.clone();
    let host = kube::non_loopback_name(upstream.trim_start_matches("http://"));
    eprintln!("prepull: pushing {} images", 2 * IMAGES);
    for way in ["direct", "kache"] {
        for i in 0..IMAGES {
            let seed = 9000 + i as u64 + if way == "kache" { 100 } else { 0 };
            let pause = pause.clone();
            let img = blocking(move || {
                ImageBuilder::new(Flavor::Oci)
                    .program("pause", pause)
                    .layer(vec![(
                        "data/blob".into(),
                        image::random_bytes(seed, IMAGE_BYTES),
                    )])
                    .build()
            })
            .await?;
            push_image(&upstream, &format!("bench/prepull-{way}-{i}"), &img).await?;
        }
    }

    eprintln!("prepull: deploying kache on the node");
    let (k, n, h, d) = (kube.clone(), node.clone(), host.clone(), dir.clone());
    let measured = blocking(move || -> Result<(Held, Held, Held)> {
        let kache = KacheOnNode::new(KACHE_IMAGE, &d.join("registry-data"), &[&h]);
        n.deploy_kache(&k, &kache, &d.join("webhook-certs"));
        // The puller's pods pull from the upstream over plain HTTP.
        let hosts = n.hosts_dir().join(&h);
        std::fs::create_dir_all(&hosts)?;
        std::fs::write(
            hosts.join("hosts.toml"),
            format!("server = \"http://{h}\"\n\n[host.\"http://{h}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
        )?;

        // The puller's way.
        let direct = puller_daemon_set(&h);
        let t0 = Instant::now();
        k.ok("POST", &format!("/apis/apps/v1/namespaces/{NS}/daemonsets"), Some(&direct));
        let pods = wait_pods_ready(&k, "app=puller", 1, &[], t0)?;
        let direct = Held {
            ready: t0.elapsed(),
            memory: n.pod_memory(&pods[0], "c0"),
        };
        eprintln!("  puller: ready in {}", secs(direct.ready));

        // kache's: cold (the registry fetches every image), then warm (the node forgot them).
        let images: Vec<String> = (0..IMAGES)
            .map(|i| format!("{h}/bench/prepull-kache-{i}:v1"))
            .collect();
        let t0 = Instant::now();
        k.ok(
            "POST",
            "/apis/kache.io/v1alpha1/nodeimagesets",
            Some(&json!({"apiVersion": "kache.io/v1alpha1", "kind": "NodeImageSet",
                "metadata": {"name": "bench"}, "spec": {"images": images}})),
        );
        let holders = "kache.io/node-image-set=bench";
        let pods = wait_pods_ready(&k, holders, LANES, &[], t0)?;
        let memory = |pods: &[String]| pods.iter().map(|p| n.pod_memory(p, "hold")).sum();
        let cold = Held {
            ready: t0.elapsed(),
            memory: memory(&pods),
        };
        eprintln!("  kache cold: ready in {}", secs(cold.ready));
        n.forget("localhost:7439/");
        let t0 = Instant::now();
        for pod in &pods {
            k.ok(
                "DELETE",
                &format!("/api/v1/namespaces/{NS}/pods/{pod}?gracePeriodSeconds=0"),
                None,
            );
        }
        let again = wait_pods_ready(&k, holders, LANES, &pods, t0)?;
        let warm = Held {
            ready: t0.elapsed(),
            memory: memory(&again),
        };
        eprintln!("  kache warm: ready in {}", secs(warm.ready));
        Ok((direct, cold, warm))
    })
    .await?;
    let (direct, cold, warm) = match measured {
        Ok(m) => m,
        Err(e) => {
            report.note(format!("prepull: {e:#}"));
            let _ = writeln!(report.md, "Failed: {e:#}\n");
            return Ok(());
        }
    };
    drop(node);
    drop(kube);

    let _ = writeln!(
        report.md,
        "Time from the pods' creation (for kache cold, the NodeImageSet's, warming included) \
         until they are Ready with every image on the node; memory is what the pods' cgroups \
         charge then (kernel figures, page cache included; kache's {LANES} lane pods summed). \
         The puller's containers run the pause program here, smaller than its own Go \
         `sleep`.\n\n\
         | way | every image present | vs the puller | pod memory | vs the puller |\n\
         | --- | ---: | ---: | ---: | ---: |"
    );
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / MIB as f64);
    for (label, h) in [
        (
            "image-puller: one container per image, straight from the upstream",
            direct,
        ),
        ("kache NodeImageSet, cold (the registry fetches them)", cold),
        ("kache NodeImageSet, warm (the node forgot them)", warm),
    ] {
        let _ = writeln!(
            report.md,
            "| {label} | {} | {} | {} | {} |",
            secs(h.ready),
            ratio(h.ready.as_secs_f64(), direct.ready.as_secs_f64()),
            mib(h.memory),
            ratio(h.memory as f64, direct.memory as f64),
        );
    }
    let _ = writeln!(report.md);
    Ok(())
}

/// A DaemonSet as the image-puller makes it: one container per image, each running for ever.
fn puller_daemon_set(host: &str) -> Value {
    let containers: Vec<Value> = (0..IMAGES)
        .map(|i| {
            json!({
                "name": format!("c{i}"),
                "image": format!("{host}/bench/prepull-direct-{i}:v1"),
                "imagePullPolicy": "IfNotPresent",
                "command": ["/pause"],
                // The puller's defaults.
                "resources": {"requests": {"memory": "10Mi"}, "limits": {"memory": "20Mi"}},
            })
        })
        .collect();
    json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "puller"},
        "spec": {
            "selector": {"matchLabels": {"app": "puller"}},
            "template": {
                "metadata": {"labels": {"app": "puller", "kache.io/image-caching-policy": "ignore"}},
                "spec": {"terminationGracePeriodSeconds": 0, "containers": containers},
            },
        },
    })
}

/// Waits until `count` pods matching `selector` in kache's namespace (none of `not`) are Ready;
/// their names.
fn wait_pods_ready(
    kube: &KubeServer,
    selector: &str,
    count: usize,
    not: &[String],
    t0: Instant,
) -> Result<Vec<String>> {
    let path = format!("/api/v1/namespaces/{NS}/pods?labelSelector={selector}");
    loop {
        let (_, v) = kube.request("GET", &path, None);
        let ready: Vec<String> = v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| {
                !not.iter().any(|n| p["metadata"]["name"] == n.as_str())
                    && p["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
            .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
            .collect();
        if ready.len() >= count {
            return Ok(ready);
        }
        if t0.elapsed() > LIMIT {
            bail!("{count} pods {selector} were not Ready in {LIMIT:?}: {v}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
