//! The pod step: time from a pod's creation to Running on a real node (the test bed's kubelet,
//! containerd and runc; scripts/kube-test-node) for an image of about 100 MiB, pulled straight
//! from the upstream, through kache cold, and through kache warm after the node forgot it. kache
//! runs as users run it (crates/testkit/manifests/kache-on-node.yaml, the image scripts/build-image makes
//! from the release binary). Needs root, as a node does.
//!
//! The node and control plane come from the tests' kit (kache-testkit).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;

use super::meter::{count_log, median_by};
use super::push::{push_body_distribution, put_manifest};
use super::report::{ratio, secs};
use super::{Bench, MIB};
use crate::client;

use kache_testkit::image::{Content as _, Flavor, ImageBuilder};
use kache_testkit::kube::{KubeServer, Version};
use kache_testkit::node::{KacheOnNode, KubeNode};
use kache_testkit::{image, kube, node};

const KACHE_IMAGE: &str = "bench.invalid/kache:bench";
const NS: &str = "bench";
/// The longest a pod may take to run before the step gives up on it.
const POD_LIMIT: Duration = Duration::from_secs(300);

/// One measured pod start.
#[derive(Debug, Clone, Copy)]
struct Start {
    took: Duration,
    /// The pull alone, as the kubelet reports it (its `Pulled` event): pod start also waits for
    /// the kubelet's status loop, which moves in steps of about a second.
    pull: Duration,
    /// Blob GETs the upstream served for it.
    upstream_gets: usize,
}

pub(super) async fn pod_step(bench: &mut Bench<'_>) -> Result<()> {
    let Bench {
        o,
        work,
        kache,
        urls,
        report,
        ..
    } = bench;
    if !o.wants("pod") {
        return Ok(());
    }
    let _ = writeln!(
        report.md,
        "### Pod start on a real node ({} MiB image)\n",
        o.pod_image_mib
    );
    if std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m))? != 0 {
        let _ = writeln!(
            report.md,
            "Skipped: a node (kubelet, containerd) needs root.\n"
        );
        return Ok(());
    }
    let dir = work.join("pod");
    std::fs::create_dir_all(&dir)?;
    eprintln!("pod: starting a control plane and a node");
    let (kube, node, pause) = start_node(kache, &dir, KACHE_IMAGE).await?;

    // Two fresh images a round (one pulled straight, one through kache), pushed to the
    // upstream: the pause program and one incompressible layer.
    let upstream = urls.upstream.clone();
    let host = kube::non_loopback_name(upstream.trim_start_matches("http://"));
    eprintln!(
        "pod: pushing {} images of {} MiB",
        2 * o.rounds,
        o.pod_image_mib
    );
    let size = (o.pod_image_mib * MIB) as usize;
    for r in 0..o.rounds {
        for (i, path) in ["direct", "kache"].iter().enumerate() {
            let seed = 7000 + 2 * r as u64 + i as u64;
            let pause = pause.clone();
            let img = blocking(move || {
                ImageBuilder::new(Flavor::Oci)
                    .program("pause", pause)
                    .layer(vec![("data/blob".into(), image::random_bytes(seed, size))])
                    .build()
            })
            .await?;
            push_image(&upstream, &format!("bench/pod-{path}-{r}"), &img).await?;
        }
    }

    eprintln!("pod: deploying kache on the node");
    let (k, n, h, d) = (kube.clone(), node.clone(), host.clone(), dir.clone());
    let upstream_log = urls.upstream_log.clone();
    let rounds = o.rounds;
    let starts = blocking(move || -> Result<Vec<[Start; 3]>> {
        let kache = KacheOnNode::new(KACHE_IMAGE, &d.join("registry-data"), &[&h]);
        n.deploy_kache(&k, &kache, &d.join("webhook-certs"));
        k.namespace(NS);
        // The ignored pods pull from the upstream over plain HTTP.
        let hosts = n.hosts_dir().join(&h);
        std::fs::create_dir_all(&hosts)?;
        std::fs::write(
            hosts.join("hosts.toml"),
            format!("server = \"http://{h}\"\n\n[host.\"http://{h}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
        )?;
        let mut all = Vec::new();
        for r in 0..rounds {
            let direct = format!("{h}/bench/pod-direct-{r}:v1");
            let cached = format!("{h}/bench/pod-kache-{r}:v1");
            let one = |name: &str, image: &str, ignore: bool, repo: &str| -> Result<Start> {
                let before = count_log(&upstream_log, "GET", &format!("/v2/{repo}/blobs/"));
                let took = time_to_running(&k, name, image, ignore)?;
                let pull = kubelet_pull_time(&k, name)?;
                let upstream_gets =
                    count_log(&upstream_log, "GET", &format!("/v2/{repo}/blobs/")) - before;
                forget_all(&k, &n, &h)?;
                Ok(Start {
                    took,
                    pull,
                    upstream_gets,
                })
            };
            let d = one(&format!("direct-{r}"), &direct, true, &format!("bench/pod-direct-{r}"))?;
            let c = one(&format!("cold-{r}"), &cached, false, &format!("bench/pod-kache-{r}"))?;
            let w = one(&format!("warm-{r}"), &cached, false, &format!("bench/pod-kache-{r}"))?;
            eprintln!(
                "  round {r}: direct {}, kache cold {}, kache warm {}",
                secs(d.took),
                secs(c.took),
                secs(w.took)
            );
            all.push([d, c, w]);
        }
        Ok(all)
    })
    .await?;
    let starts = match starts {
        Ok(s) => s,
        Err(e) => {
            report.note(format!("pod: {e:#}"));
            let _ = writeln!(report.md, "Failed: {e:#}\n");
            return Ok(());
        }
    };
    drop(node);
    drop(kube);

    let _ = writeln!(
        report.md,
        "Median of {} round(s); each pod's image is new to the node (the warm one after the node \
         forgot it, content included). The pull is the kubelet's own measure (its `Pulled` event); \
         Running also waits for the kubelet's status loop, which moves in steps of about a \
         second.\n\n| path | pod created → Running | the pull | pull vs straight | upstream blob GETs |\n| --- | ---: | ---: | ---: | ---: |",
        starts.len()
    );
    let labels = [
        "straight from the upstream (pod labelled `ignore`)",
        "through kache, cold (proxy → registry → upstream)",
        "through kache, warm (the node forgot the image)",
    ];
    let median = |i: usize, key: fn(&Start) -> Duration| {
        key(&median_by(starts.iter().map(|s| s[i]).collect(), |s| {
            key(s).as_secs_f64()
        }))
    };
    let direct_pull = median(0, |s| s.pull);
    for (i, label) in labels.iter().enumerate() {
        let pull = median(i, |s| s.pull);
        let _ = writeln!(
            report.md,
            "| {label} | {} | {} | {} | {} |",
            secs(median(i, |s| s.took)),
            secs(pull),
            ratio(pull.as_secs_f64(), direct_pull.as_secs_f64()),
            starts.iter().map(|s| s[i].upstream_gets).max().unwrap_or(0)
        );
    }
    let _ = writeln!(report.md);
    Ok(())
}

/// A current control plane and a node holding the kache image `image` (built from `kache` into
/// `dir`), and the node's pause program.
pub(super) async fn start_node(
    kache: &std::path::Path,
    dir: &std::path::Path,
    image: &'static str,
) -> Result<(Arc<KubeServer>, Arc<KubeNode>, Vec<u8>)> {
    let (kache, out) = (kache.to_owned(), dir.join("image"));
    let (kube, node, pause) = blocking(move || {
        let kube = KubeServer::start(Version::Current);
        let node = KubeNode::start(&kube);
        node::build_kache_image(&kache, &out, Some(image));
        node.import(&out.join("kache-image.tar"));
        let pause = std::fs::read(kube.bin.join("pause")).expect("the pause program");
        (kube, node, pause)
    })
    .await?;
    Ok((Arc::new(kube), Arc::new(node), pause))
}

/// Runs blocking work (the test kit's calls wait and panic) off the async workers; a panic
/// becomes an error.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(move || std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)))
        .await?
        .map_err(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            anyhow!("the node failed: {msg}")
        })
}

/// Pushes every blob of `img`, then its manifest as `v1`, to a distribution.
pub(super) async fn push_image(base: &str, repo: &str, img: &image::Image) -> Result<()> {
    for blob in [&img.config].into_iter().chain(&img.layers) {
        let body = Bytes::from(blob.bytes.clone());
        let len = body.len() as u64;
        push_body_distribution(base, repo, &blob.digest, client::full(body), len).await?;
    }
    put_manifest(base, repo, &Bytes::from(img.top().bytes.clone())).await
}

/// Creates a pod running `image` in NS and times it until it runs and is ready.
fn time_to_running(kube: &KubeServer, name: &str, image: &str, ignore: bool) -> Result<Duration> {
    let mut labels = serde_json::json!({"app": "bench"});
    if ignore {
        labels["kache.io/image-caching-policy"] = "ignore".into();
    }
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "app", "image": image, "imagePullPolicy": "IfNotPresent"}],
        },
    });
    let path = format!("/api/v1/namespaces/{NS}/pods");
    let t0 = Instant::now();
    let (code, v) = kube.request("POST", &path, Some(&pod));
    if code != 201 {
        bail!("creating pod {name}: {code} {v}");
    }
    loop {
        let (_, v) = kube.request("GET", &format!("{path}/{name}"), None);
        if v["status"]["phase"] == "Running" && v["status"]["containerStatuses"][0]["ready"] == true
        {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > POD_LIMIT {
            bail!("pod {name} did not run in {POD_LIMIT:?}: {}", v["status"]);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pull time the kubelet reported for `pod`: "Successfully pulled image ... in 1.234s
/// (1.234s including waiting) ...".
fn kubelet_pull_time(kube: &KubeServer, pod: &str) -> Result<Duration> {
    let path = format!("/api/v1/namespaces/{NS}/events?fieldSelector=involvedObject.name={pod}");
    let (_, v) = kube.request("GET", &path, None);
    let message = v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["reason"] == "Pulled")
        .find_map(|e| e["message"].as_str())
        .with_context(|| format!("no Pulled event for {pod}"))?;
    let took = message
        .split(" in ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("no time in {message:?}"))?;
    go_duration(took).with_context(|| format!("a time in {message:?}"))
}

/// A Go `time.Duration` as printed: `1.5s`, `850ms`, `1m2.5s`, `12µs`.
fn go_duration(s: &str) -> Option<Duration> {
    let mut total = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..end].parse().ok()?;
        rest = &rest[end..];
        let unit = ["ns", "µs", "us", "ms", "s", "m", "h"]
            .into_iter()
            .find(|u| rest.starts_with(u))?;
        rest = &rest[unit.len()..];
        total += n * match unit {
            "ns" => 1e-9,
            "µs" | "us" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            _ => 3600.0,
        };
    }
    Some(Duration::from_secs_f64(total))
}

/// Deletes every pod of NS and makes the node forget every image it pulled.
fn forget_all(kube: &KubeServer, node: &KubeNode, host: &str) -> Result<()> {
    let path = format!("/api/v1/namespaces/{NS}/pods");
    kube.request("DELETE", &format!("{path}?gracePeriodSeconds=0"), None);
    let deadline = Instant::now() + POD_LIMIT;
    loop {
        let (_, v) = kube.request("GET", &path, None);
        if v["items"].as_array().is_some_and(|a| a.is_empty()) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the pods of {NS} were never deleted");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    node.forget("localhost:7439/");
    node.forget(&format!("{host}/"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_as_the_kubelet_prints_them() {
        let ms = Duration::from_millis;
        assert_eq!(go_duration("1.5s"), Some(ms(1500)));
        assert_eq!(go_duration("850ms"), Some(ms(850)));
        assert_eq!(go_duration("1m2.5s"), Some(ms(62_500)));
        assert_eq!(go_duration("12µs"), Some(Duration::from_micros(12)));
        assert_eq!(go_duration("1.5"), None);
        assert_eq!(go_duration("fast"), None);
    }
}
