//! The repository's docker-compose.yml, run for real with Debian's podman and PyPI's
//! podman-compose: the stack starts, the seeded image is pulled through the proxy, the upstream
//! stops and the same pull is served from the cache, and `down -v` leaves nothing behind.
//!
//! The images are built here as users would not: kache's from this build (`scripts/build-image`),
//! the upstream's from Debian's CNCF distribution with busybox's wget for its healthcheck, the
//! seed's from Debian's skopeo, so that nothing is pulled from a public registry.

use kache_testkit as support;

use std::path::Path;
use std::time::Duration;

use serde_yaml::Value;
use support::Skopeo;
use support::compose::{Stack, compose_config, compose_file, podman_compose};
use support::containerd::skip_unless_root;
use support::metrics;
use support::node::{build_kache_image, build_program_image};
use support::pki::free_addr;

/// What compose/seed holds: demo/hello:1's manifest and its one layer.
const SEED_MANIFEST: &str =
    "sha256:d5ce9661c46c373351410706fdc1632698d9f34e2a29f51bb296ac82d0b740d1";
const SEED_LAYER: &str = "sha256:4c59c894a5f5491c27cefdb2b6f81a3a0274b2fa78fa3d5c1be5e31be0991580";
/// Long enough for a container to start on a slow machine; every wait ends when its condition
/// holds.
const WAIT: Duration = Duration::from_secs(120);

fn skip_without_podman_compose(test: &str) -> bool {
    if podman_compose().is_none() || compose_config().is_none() {
        eprintln!("skipping {test}: the compose peers are not built (scripts/compose-test-peers)");
        return true;
    }
    false
}

/// A free port on 127.0.0.1 for each published port of the stack.
fn ports() -> Vec<(&'static str, String)> {
    [
        "KACHE_PORT_PROXY",
        "KACHE_PORT_PROXY_METRICS",
        "KACHE_PORT_REGISTRY",
        "KACHE_PORT_METRICS",
        "KACHE_PORT_UPSTREAM",
    ]
    .into_iter()
    .map(|k| (k, free_addr().rsplit_once(':').unwrap().1.to_owned()))
    .collect()
}

fn port(env: &[(&str, String)], key: &str) -> u16 {
    env.iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.parse().unwrap())
        .unwrap()
}

/// A service's published ports as `host_ip:published:target`, from the short syntax
/// (podman-compose keeps it) or the long one (compose-go normalizes to it).
fn published(config: &Value, service: &str) -> Vec<String> {
    let Some(ports) = config["services"][service]["ports"].as_sequence() else {
        return Vec::new();
    };
    ports
        .iter()
        .map(|p| match p {
            Value::String(s) => s.clone(),
            long => {
                let text = |v: &Value| match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    other => panic!("a port field: {other:?}"),
                };
                format!(
                    "{}:{}:{}",
                    text(&long["host_ip"]),
                    text(&long["published"]),
                    text(&long["target"])
                )
            }
        })
        .collect()
}

/// What the compose file promises, whichever implementation loaded it.
fn check_promises(config: &Value, env: &[(&str, String)], by: &str) {
    let services = config["services"].as_mapping().expect("services");
    let mut names: Vec<&str> = services.keys().filter_map(Value::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["proxy", "registry", "seed", "upstream"], "{by}");

    // Every published port is on 127.0.0.1, at the port its variable gives; the registry's
    // internal listener (writes) is not published.
    let expect = |key: &str, target: u16| format!("127.0.0.1:{}:{target}", port(env, key));
    assert_eq!(
        published(config, "proxy"),
        [
            expect("KACHE_PORT_PROXY", 7439),
            expect("KACHE_PORT_PROXY_METRICS", 9091)
        ],
        "{by}"
    );
    assert_eq!(
        published(config, "registry"),
        [
            expect("KACHE_PORT_REGISTRY", 5000),
            expect("KACHE_PORT_METRICS", 9090)
        ],
        "{by}"
    );
    assert_eq!(
        published(config, "upstream"),
        [expect("KACHE_PORT_UPSTREAM", 5000)],
        "{by}"
    );
    assert!(published(config, "seed").is_empty(), "{by}");
    let registry_args: Vec<&str> = config["services"]["registry"]["command"]
        .as_sequence()
        .expect("the registry's command")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        registry_args.contains(&"--internal-listen=0.0.0.0:5001"),
        "{by}: {registry_args:?}"
    );
    // The free-space floor: 5% unless KACHE_MIN_FREE says otherwise.
    let min_free = env
        .iter()
        .find(|(k, _)| *k == "KACHE_MIN_FREE")
        .map_or("5%", |(_, v)| v.as_str());
    assert_eq!(
        config["services"]["registry"]["environment"]["KACHE_MIN_FREE"].as_str(),
        Some(min_free),
        "{by}"
    );

    // A service others wait for has a healthcheck to wait on (docker compose refuses to start
    // the stack otherwise, though neither loader checks it), and so does every long-running
    // service.
    for (name, service) in services {
        let name = name.as_str().unwrap();
        if name != "seed" {
            assert!(
                service["healthcheck"]["test"].is_sequence(),
                "{by}: {name} has a healthcheck"
            );
        }
        if let Some(deps) = service["depends_on"].as_mapping() {
            for (dep, how) in deps {
                assert_eq!(
                    how["condition"], "service_healthy",
                    "{by}: {name} → {dep:?}"
                );
                assert!(
                    config["services"][dep]["healthcheck"]["test"].is_sequence(),
                    "{by}: {name} waits for {dep:?}, which has no healthcheck"
                );
            }
        }
    }
    // kache runs as the image's non-root user, on a read-only root, without capabilities.
    for name in ["registry", "proxy"] {
        let s = &config["services"][name];
        assert_eq!(s["image"], "localhost/kache-test/kache:compose", "{by}");
        assert_eq!(s["read_only"], true, "{by}: {name}");
        assert_eq!(s["cap_drop"][0], "ALL", "{by}: {name}");
        assert!(s["user"].is_null(), "{by}: {name} keeps the image's user");
    }
}

#[test]
fn both_compose_implementations_load_the_file_with_ports_on_loopback_and_health_to_wait_on() {
    let name =
        "both_compose_implementations_load_the_file_with_ports_on_loopback_and_health_to_wait_on";
    if skip_without_podman_compose(name) {
        return;
    }
    let mut env = ports();
    env.push(("KACHE_IMAGE", "localhost/kache-test/kache:compose".into()));
    let stack = Stack::new(compose_file(), "kache-config", &env);

    let rendered = stack.compose_ok(&["config"]);
    let config: Value = serde_yaml::from_str(&rendered).expect("config prints YAML");
    check_promises(&config, &env, "podman-compose");

    // docker compose's own loader: the compose specification's schema (a misspelt key fails
    // here, not in podman-compose), interpolation, the `x-kache` merge.
    let loaded = stack.docker_compose_config();
    assert!(
        loaded.success(),
        "compose-go refused the file: {}",
        loaded.stderr
    );
    let config: Value = serde_yaml::from_str(&loaded.stdout).expect("compose-config prints YAML");
    check_promises(&config, &env, "compose-go");
}

#[test]
fn the_stack_pulls_through_the_proxy_and_serves_from_the_cache_when_the_upstream_is_gone() {
    let name =
        "the_stack_pulls_through_the_proxy_and_serves_from_the_cache_when_the_upstream_is_gone";
    if skip_unless_root(name) || skip_without_podman_compose(name) {
        return;
    }
    let images = tempfile::tempdir().unwrap();
    let kache = "localhost/kache-test/kache:compose";
    let upstream = "localhost/kache-test/distribution:compose";
    let seed = "localhost/kache-test/skopeo:compose";
    build_kache_image(
        Path::new(env!("CARGO_BIN_EXE_kache")),
        &images.path().join("kache"),
        Some(kache),
    );
    // The official registry image runs `registry serve` and has busybox's wget; so does this one.
    let upstream_archive = build_program_image(
        Path::new("/usr/bin/docker-registry"),
        &images.path().join("upstream"),
        "registry",
        "compose",
        upstream,
        &[(Path::new("/bin/busybox"), "wget")],
    );
    let seed_archive = build_program_image(
        Path::new("/usr/bin/skopeo"),
        &images.path().join("seed"),
        "skopeo",
        "compose",
        seed,
        &[],
    );

    let mut env = ports();
    env.extend([
        ("KACHE_IMAGE", kache.to_owned()),
        ("KACHE_UPSTREAM_IMAGE", upstream.to_owned()),
        ("KACHE_SEED_IMAGE", seed.to_owned()),
        // What the cache holds must not depend on how full the test machine's disk is (at 95%
        // used, the 5% floor evicted the image the moment it was pulled).
        ("KACHE_MIN_FREE", "0".to_owned()),
    ]);
    let mut stack = Stack::new(compose_file(), "kache-e2e", &env);
    stack.load(&images.path().join("kache/kache-image.tar"));
    stack.load(&upstream_archive);
    stack.load(&seed_archive);

    stack.up();
    for service in ["upstream", "registry", "proxy"] {
        stack.wait_healthy(service, WAIT);
    }
    let seeded = stack.wait_exited("seed", WAIT);
    assert_eq!(
        seeded,
        0,
        "the seed pushed demo/hello:1:\n{}",
        stack.logs(&stack.container("seed"))
    );

    let skopeo = Skopeo::new();
    let out = tempfile::tempdir().unwrap();
    let proxy = port(&env, "KACHE_PORT_PROXY");
    let image = format!("docker://127.0.0.1:{proxy}/upstream_5000/demo/hello:1");
    let pull = |dest: &str| {
        let layout = out.path().join(dest);
        let target = format!("oci:{}:hello", layout.display());
        let copied = skopeo.try_run(&[
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
            &image,
            &target,
        ]);
        assert!(
            copied.status.success(),
            "pulling {image} into {dest}: {}\n--- proxy ---\n{}\n--- registry ---\n{}",
            String::from_utf8_lossy(&copied.stderr),
            stack.logs(&stack.container("proxy")),
            stack.logs(&stack.container("registry")),
        );
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        index["manifests"][0]["digest"].as_str().unwrap().to_owned()
    };
    assert_eq!(
        pull("first"),
        SEED_MANIFEST,
        "the seeded image, byte for byte"
    );
    let proxy_metrics = format!(
        "http://127.0.0.1:{}/metrics",
        port(&env, "KACHE_PORT_PROXY_METRICS")
    );
    let registry_metrics = format!(
        "http://127.0.0.1:{}/metrics",
        port(&env, "KACHE_PORT_METRICS")
    );
    let text = metrics::scrape(&proxy_metrics);
    let misses = metrics::value(&text, "kache_proxy_requests_total", &[("result", "miss")]);
    assert!(misses >= 1.0, "the first pull went upstream: {text}");
    assert_eq!(
        metrics::value(
            &text,
            "kache_proxy_requests_total",
            &[("result", "fallback")]
        ),
        0.0,
        "through the registry, not around it"
    );

    // The cache's files, on the named volume: the layer, as pulled.
    let data = stack.volume_path("data");
    let hex = SEED_LAYER.strip_prefix("sha256:").unwrap();
    let cached = data.join("blobs/sha256").join(&hex[..2]).join(hex);
    let seed_layer = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../compose/seed/blobs/sha256")
        .join(hex);
    assert_eq!(
        std::fs::read(&cached)
            .unwrap_or_else(|e| panic!("{} on the volume: {e}", cached.display())),
        std::fs::read(&seed_layer).unwrap()
    );

    // The upstream goes, with everything it held (it keeps images in memory).
    stack.compose_ok(&["stop", "upstream"]);
    let (state, _) = stack.state(&stack.container("upstream"));
    assert_eq!(state, "exited");
    let upstream_url = format!("http://127.0.0.1:{}/v2/", port(&env, "KACHE_PORT_UPSTREAM"));
    assert!(
        support::http::try_request("GET", &upstream_url, &[], &[]).is_err(),
        "the upstream no longer answers"
    );

    assert_eq!(pull("second"), SEED_MANIFEST, "served from the cache");
    let text = metrics::scrape(&proxy_metrics);
    assert!(
        metrics::value(&text, "kache_proxy_requests_total", &[("result", "hit")]) >= 2.0,
        "the manifest and the layer came from the cache: {text}"
    );
    assert_eq!(
        metrics::value(&text, "kache_proxy_requests_total", &[("result", "miss")]),
        misses,
        "nothing new went upstream"
    );
    // An image the cache never saw has nowhere to come from now: a clear error, not a hang.
    let missing = skopeo.try_run(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://127.0.0.1:{proxy}/upstream_5000/demo/never:1"),
    ]);
    assert!(!missing.status.success());
    let registry_text = metrics::scrape(&registry_metrics);
    assert!(
        registry_text.contains("kache_registry_store_bytes"),
        "{registry_text}"
    );

    // The internal listener is not published, but `kache gc` reaches it inside the network.
    let gc = stack.compose_ok(&[
        "run",
        "--rm",
        "--no-deps",
        "proxy",
        "gc",
        "--registry",
        "http://registry:5001",
        "--dry-run",
    ]);
    assert!(gc.contains("would remove 0 blobs"), "{gc}");
    assert!(gc.contains("the store holds"), "{gc}");

    let network = format!("{}_default", stack.project());
    let bridge = stack.podman_ok(&[
        "network",
        "inspect",
        "--format",
        "{{.NetworkInterface}}",
        &network,
    ]);
    let bridge = bridge.trim().to_owned();
    assert!(!bridge.is_empty(), "{network} has a bridge");
    stack.down();
    let left = stack.leftovers();
    assert!(left.is_empty(), "down -v left {left:?}");
    assert!(!data.exists(), "the volume's files are gone");
    // Nor does the network stay in the kernel: its bridge and the firewall rules naming it.
    assert!(
        !Path::new("/sys/class/net").join(&bridge).exists(),
        "{bridge} is gone"
    );
    let rules = std::process::Command::new("iptables-save")
        .output()
        .expect("run iptables-save");
    let rules = String::from_utf8_lossy(&rules.stdout);
    let stale: Vec<&str> = rules.lines().filter(|l| l.contains(&bridge)).collect();
    assert!(stale.is_empty(), "rules left for {bridge}: {stale:?}");
}
