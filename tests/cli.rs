//! The binary as an operator meets it: `kache dev`, the metrics listener, log formats.

use kache_testkit as support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::KacheRegistry;
use support::http::{get, request, try_request};

/// A port nobody listens on (it was free a moment ago).
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Where a kache child started with `--ready-file ready` listens: `name -> first address`.
fn bound(
    child: &mut std::process::Child,
    ready: &std::path::Path,
) -> std::collections::BTreeMap<String, String> {
    support::process::wait_ready_file(child, ready, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("kache never said where it listens: {e:?}"))
        .into_iter()
        .map(|(k, v)| (k, v[0].to_string()))
        .collect()
}

fn wait_for(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if try_request("GET", url, &[], &[]).is_ok_and(|r| r.status == 200) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{url} never answered 200");
}

/// A metric's value from the Prometheus text format, by its full series name.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn metrics_count_requests_bytes_and_store_size() {
    let data = tempfile::tempdir().unwrap();
    let registry = KacheRegistry::start_with_internal(data.path(), &[] as &[&str]);
    let base = registry.internal_url();
    let body = vec![7u8; 10_000];
    let d = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body))
    );
    let r = request(
        "POST",
        &format!("{base}/v2/m/blobs/uploads/?digest={d}"),
        &[],
        &body,
    );
    assert_eq!(r.status, 201);
    assert_eq!(get(&format!("{base}/v2/m/blobs/{d}"), &[]).status, 200);
    assert_eq!(
        get(&format!("{base}/v2/m/blobs/sha256:bad"), &[]).status,
        400
    );

    let ops = format!("http://{}", registry.metrics_addr());
    assert_eq!(get(&format!("{ops}/healthz"), &[]).status, 200);
    assert_eq!(get(&format!("{ops}/readyz"), &[]).status, 200);
    let text = get(&registry.metrics_url(), &[]).text();
    assert_eq!(
        metric(
            &text,
            r#"kache_registry_requests_total{route="blob",method="GET",status="200"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"kache_registry_requests_total{route="upload",method="POST",status="201"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"kache_registry_requests_total{route="invalid",method="GET",status="400"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "kache_registry_received_bytes_total"),
        Some(10_000.0)
    );
    assert_eq!(
        metric(&text, "kache_registry_sent_bytes_total"),
        Some(10_000.0)
    );
    assert_eq!(metric(&text, "kache_registry_store_bytes"), Some(10_000.0));
}

#[test]
fn dev_serves_from_kache_data_in_the_working_directory_with_json_logs() {
    let cwd = tempfile::tempdir().unwrap();
    // Every listener on :0, and kache says where (the log, and --ready-file): a kache proxy
    // (or anything) on this machine's 7439 changes nothing.
    let log = cwd.path().join("log");
    let ready = cwd.path().join("ready.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kache"))
        .args(["--log-format", "json", "dev"])
        .args(["--listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0", "--ready-file"])
        .arg(&ready)
        .current_dir(cwd.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let at = bound(&mut child, &ready);
    let (listen, proxy, metrics) = (&at["listen"], &at["proxy"], &at["metrics"]);
    for addr in [listen, proxy, metrics] {
        assert!(!addr.ends_with(":0"), "{at:?}");
    }
    wait_for(&format!("http://{listen}/v2/"));
    wait_for(&format!("http://{metrics}/readyz"));
    let r = request(
        "PUT",
        &format!("http://{listen}/v2/dev/manifests/v1"),
        &[("content-type", "application/vnd.oci.image.index.v1+json")],
        br#"{"schemaVersion":2,"manifests":[]}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    // The proxy in front of it serves the same registry.
    wait_for(&format!("http://{proxy}/v2/"));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(cwd.path().join("kache-data/index.redb").exists());
    let logs = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    // How to use it, with the addresses it has; and where each listener is.
    assert!(
        lines.iter().any(|v| v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("kache dev") && m.contains(proxy.as_str()))),
        "{logs}"
    );
    for (name, addr) in [("listen", listen), ("proxy", proxy), ("metrics", metrics)] {
        assert!(
            lines.iter().any(|v| v["fields"]["message"] == "listening"
                && v["fields"]["listener"] == name
                && v["fields"]["addr"] == addr.as_str()),
            "no listening line for {name} at {addr}: {logs}"
        );
    }
}

#[test]
fn bad_flags_fail_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_kache"))
        .args(["registry", "--upload-timeout", "2w"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown unit"), "{err}");
}

fn kache(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kache"))
        .args(args)
        .output()
        .unwrap()
}

/// What `curl --cacert ca.crt` gets from `https://<name>:<port>/healthz` at `addr`, or its
/// error: a client that trusts only the CA and checks the name, as the API server does.
fn curl_tls(ca: &std::path::Path, name: &str, addr: &str) -> Result<String, String> {
    let port = addr.rsplit_once(':').unwrap().1;
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{name}:{port}:127.0.0.1")])
        .arg(format!("https://{name}:{port}/mutate"))
        .args(["-o", "/dev/null", "-w", "%{http_code}"])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn certs_makes_a_ca_and_a_webhook_certificate_the_webhook_serves_and_renews_under_the_same_ca() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("certs");
    let out = out_dir.to_str().unwrap();
    let name = "kache-webhook.kache.svc";
    let made = kache(&["certs", "--out", out, "--dns", name, "--ip", "127.0.0.1"]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    use std::os::unix::fs::PermissionsExt as _;
    for (file, mode) in [
        ("ca.crt", 0o644),
        ("ca.key", 0o600),
        ("tls.crt", 0o644),
        ("tls.key", 0o600),
    ] {
        let meta = std::fs::metadata(out_dir.join(file)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }

    // The webhook serves the pair; a client trusting only ca.crt accepts it under its name.
    let ready = dir.path().join("webhook-ready.json");
    let mut webhook = Command::new(env!("CARGO_BIN_EXE_kache"))
        .args([
            "webhook",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--tls-cert")
        .arg(out_dir.join("tls.crt"))
        .arg("--tls-key")
        .arg(out_dir.join("tls.key"))
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let at = bound(&mut webhook, &ready);
    let (listen, metrics) = (at["listen"].clone(), at["metrics"].clone());
    wait_for(&format!("http://{metrics}/readyz"));
    let ca = out_dir.join("ca.crt");
    // A GET is not an AdmissionReview: the point is the handshake, then any HTTP answer.
    assert!(
        curl_tls(&ca, name, &listen).is_ok(),
        "{:?}",
        curl_tls(&ca, name, &listen)
    );
    let other = tempfile::tempdir().unwrap();
    let stranger = kache(&[
        "certs",
        "--out",
        other.path().to_str().unwrap(),
        "--dns",
        name,
    ]);
    assert!(stranger.status.success());
    let err = curl_tls(&other.path().join("ca.crt"), name, &listen).unwrap_err();
    assert!(
        err.contains("certificate"),
        "another CA is not trusted: {err}"
    );

    // Run again: the CA is kept, the pair is new, and the running webhook serves it (re-read
    // from disk) to the same client.
    let ca_before = std::fs::read(&ca).unwrap();
    let tls_before = std::fs::read(out_dir.join("tls.crt")).unwrap();
    let again = kache(&["certs", "--out", out, "--dns", name]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("reused the CA"));
    assert_eq!(std::fs::read(&ca).unwrap(), ca_before, "the CA changed");
    assert_ne!(std::fs::read(out_dir.join("tls.crt")).unwrap(), tls_before);
    let deadline = Instant::now() + Duration::from_secs(10);
    // The new certificate names no IP: the old one did, so a client at 127.0.0.1 tells them
    // apart.
    loop {
        let by_ip = Command::new("curl")
            .args(["-sS", "--max-time", "5", "--cacert"])
            .arg(&ca)
            .arg(format!("https://{listen}/mutate"))
            .args(["-o", "/dev/null"])
            .output()
            .unwrap();
        if !by_ip.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the webhook never served the renewed pair"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        curl_tls(&ca, name, &listen).is_ok(),
        "{:?}",
        curl_tls(&ca, name, &listen)
    );
    webhook.kill().unwrap();
    webhook.wait().unwrap();
}

#[test]
fn certs_refuses_what_it_cannot_do_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let none = kache(&["certs", "--out", out]);
    assert!(!none.status.success());
    assert!(
        String::from_utf8_lossy(&none.stderr).contains("at least one --dns or --ip"),
        "{}",
        String::from_utf8_lossy(&none.stderr)
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "something was written"
    );

    let bad_ip = kache(&["certs", "--out", out, "--ip", "not-an-ip"]);
    assert!(!bad_ip.status.success());
    assert!(String::from_utf8_lossy(&bad_ip.stderr).contains("--ip"));

    // Half a CA: neither guessed at nor replaced.
    std::fs::write(dir.path().join("ca.crt"), "kept").unwrap();
    let half = kache(&["certs", "--out", out, "--dns", "x"]);
    assert!(!half.status.success());
    assert!(
        String::from_utf8_lossy(&half.stderr).contains("has one of ca.crt and ca.key"),
        "{}",
        String::from_utf8_lossy(&half.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ca.crt")).unwrap(),
        "kept"
    );
    assert!(!dir.path().join("tls.crt").exists());
}

/// During a surge update two proxies hold a node's port at once: the new one binds beside the
/// old (SO_REUSEPORT), and the port answers throughout the old one's exit.
#[test]
fn a_second_proxy_binds_the_same_port_and_serves_when_the_first_exits() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready.json");
    let start = |listen: &str, metrics: &str| {
        Command::new(env!("CARGO_BIN_EXE_kache"))
            .args(["proxy", "--listen", listen, "--metrics-listen", metrics])
            .args(["--registry", "http://127.0.0.1:1", "--ready-file"])
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // The first on :0; the second on the ports the first was given.
    let mut old = start("127.0.0.1:0", "127.0.0.1:0");
    let at = bound(&mut old, &ready);
    let (listen, metrics) = (at["proxy"].clone(), at["metrics"].clone());
    wait_for(&format!("http://{metrics}/readyz"));
    let mut new = start(&listen, &metrics);
    // The new proxy is up beside the old one (without SO_REUSEPORT it exits: address in use).
    std::thread::sleep(Duration::from_millis(500));
    assert!(new.try_wait().unwrap().is_none(), "the second proxy exited");
    // SIGTERM to the old one, as the kubelet does once the new pod is Ready.
    Command::new("kill")
        .args(["-TERM", &old.id().to_string()])
        .status()
        .unwrap();
    old.wait().unwrap();
    for _ in 0..20 {
        let r = try_request("GET", &format!("http://{listen}/v2/"), &[], &[]);
        assert!(r.is_ok(), "the port stopped answering: {r:?}");
        assert_eq!(get(&format!("http://{metrics}/readyz"), &[]).status, 200);
    }
    new.kill().unwrap();
    new.wait().unwrap();
}

/// On SIGTERM the webhook keeps answering for --shutdown-delay (its endpoint is still listed
/// while the pod terminates), then exits by itself.
#[test]
fn the_webhook_serves_through_its_shutdown_delay_then_exits() {
    let dir = tempfile::tempdir().unwrap();
    let made = kache(&[
        "certs",
        "--out",
        dir.path().to_str().unwrap(),
        "--dns",
        "localhost",
    ]);
    assert!(made.status.success());
    let ready = dir.path().join("ready.json");
    let mut webhook = Command::new(env!("CARGO_BIN_EXE_kache"))
        .args([
            "webhook",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--shutdown-delay", "2s"])
        .arg("--tls-cert")
        .arg(dir.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.path().join("tls.key"))
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let at = bound(&mut webhook, &ready);
    let (listen, metrics) = (at["listen"].clone(), at["metrics"].clone());
    wait_for(&format!("http://{metrics}/readyz"));
    let asked = Instant::now();
    Command::new("kill")
        .args(["-TERM", &webhook.id().to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(get(&format!("http://{metrics}/readyz"), &[]).status, 200);
    assert!(curl_tls(&dir.path().join("ca.crt"), "localhost", &listen).is_ok());
    // Then it goes, on its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    while webhook.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the webhook never exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        asked.elapsed() >= Duration::from_secs(2),
        "it stopped before its delay"
    );
}

#[test]
fn health_exits_zero_only_on_a_2xx_answer_and_says_what_it_got_otherwise() {
    let data = tempfile::tempdir().unwrap();
    let registry = KacheRegistry::start_with_internal(data.path(), &[] as &[&str]);
    let ops = format!("http://{}", registry.metrics_addr());
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();

    let ok = kache(&["health", "--url", &format!("{ops}/readyz")]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert!(text(&ok.stdout).contains("answered 200 OK"));

    let not_found = kache(&["health", "--url", &format!("{ops}/nowhere")]);
    assert!(!not_found.status.success());
    assert!(
        text(&not_found.stderr).contains("answered 404 Not Found"),
        "{}",
        text(&not_found.stderr)
    );

    // Nothing listens: refused at once.
    let closed = free_addr();
    let refused = kache(&["health", "--url", &format!("http://{closed}/readyz")]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("cannot be reached"),
        "{}",
        text(&refused.stderr)
    );

    // A listener that takes the connection (the kernel's backlog) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung = kache(&[
        "health",
        "--timeout",
        "1s",
        "--url",
        &format!("http://{}/readyz", silent.local_addr().unwrap()),
    ]);
    assert!(!hung.status.success());
    assert!(
        text(&hung.stderr).contains("did not answer within 1s"),
        "{}",
        text(&hung.stderr)
    );

    let tls = kache(&["health", "--url", "https://127.0.0.1:1/readyz"]);
    assert!(!tls.status.success());
    assert!(
        text(&tls.stderr).contains("must be plain http://"),
        "{}",
        text(&tls.stderr)
    );
}

/// A field of `/proc/<pid>/status`.
fn proc_status(pid: u32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

#[test]
fn prepull_programs_writes_a_no_op_and_a_hold_that_waits_for_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let made = kache(&["prepull", "programs", "--dir", dir.path().to_str().unwrap()]);
    assert!(made.status.success(), "{made:?}");
    let ran = std::process::Command::new(dir.path().join("noop"))
        .env_clear()
        .status()
        .unwrap();
    assert!(ran.success(), "{ran:?}");

    // `hold` runs until SIGTERM or SIGINT, then exits 0: as a plain process, and as the first
    // process of a PID namespace, as in a container, where a signal with no handler reaches it
    // only because it is blocked and waited for.
    let hold = dir.path().join("hold");
    let plain = || std::process::Command::new(&hold);
    let mut in_namespace = std::process::Command::new("unshare");
    in_namespace
        .args(["--pid", "--fork", "--kill-child"])
        .arg(&hold);
    let root = is_root();
    for (mut cmd, signal, how) in [
        (plain(), "TERM", "plain"),
        (plain(), "INT", "plain"),
        (in_namespace, "TERM", "PID 1"),
    ] {
        if how == "PID 1" && !root {
            eprintln!("not root: hold is not tried as a PID namespace's first process");
            continue;
        }
        let mut child = cmd.env_clear().spawn().unwrap();
        // The process to signal: hold itself (under unshare, its child), once it waits in
        // rt_sigtimedwait (while it waits, the kernel shows the waited signals unblocked).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let target = loop {
            let pid = if how == "PID 1" {
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
                    .ok()
                    .and_then(|c| c.split_whitespace().next()?.parse::<u32>().ok())
            } else {
                Some(child.id())
            };
            let waiting = pid
                .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/syscall")).ok())
                .is_some_and(|s| s.split_whitespace().next() == Some(SIGTIMEDWAIT));
            if let Some(p) = pid.filter(|_| waiting) {
                break p;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{how}: hold never waited for a signal");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let rss: u64 = proc_status(target, "VmRSS")
            .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(u64::MAX);
        assert!(rss <= 64, "{how}: hold uses {rss} kB");
        let sent = std::process::Command::new("kill")
            .args([format!("-{signal}"), target.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{how}: hold did not stop on SIG{signal}");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert!(status.success(), "{how}, SIG{signal}: {status:?}");
    }

    // Somewhere it cannot write: a clear error, and nothing left behind.
    let refused = kache(&["prepull", "programs", "--dir", "/proc/kache-programs"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("/proc/kache-programs"), "{err}");
}

/// The number of rt_sigtimedwait, as /proc/<pid>/syscall shows it.
const SIGTIMEDWAIT: &str = if cfg!(target_arch = "aarch64") {
    "137"
} else {
    "128"
};

/// Whether this process runs as root.
fn is_root() -> bool {
    proc_status(std::process::id(), "Uid")
        .and_then(|u| u.split_whitespace().next().map(|u| u == "0"))
        .unwrap_or(false)
}

#[test]
fn prepull_convert_prints_a_node_image_set_or_names_the_bad_entry_and_prints_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config_map = dir.path().join("puller.yaml");
    std::fs::write(
        &config_map,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: puller, namespace: ip}\n\
         data:\n  IMAGES: 'a=redis:7;b=python:3.12;'\n  CACHING_MEMORY_LIMIT: 20Mi\n",
    )
    .unwrap();
    let made = kache(&["prepull", "convert", config_map.to_str().unwrap()]);
    assert!(made.status.success(), "{made:?}");
    let set: serde_json::Value = serde_yaml::from_slice(&made.stdout).unwrap();
    assert_eq!(set["kind"], "NodeImageSet");
    assert_eq!(set["metadata"]["name"], "puller");
    assert_eq!(
        set["spec"]["images"],
        serde_json::json!(["redis:7", "python:3.12"])
    );
    let note = String::from_utf8_lossy(&made.stderr);
    assert!(note.contains("CACHING_MEMORY_LIMIT"), "{note}");

    let refused = kache(&["prepull", "convert", "--images", "a=redis:7;python:3.12"]);
    assert!(!refused.status.success());
    assert!(refused.stdout.is_empty(), "{refused:?}");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("IMAGES entry 2 \"python:3.12\": expected name=image"),
        "{err}"
    );
}
