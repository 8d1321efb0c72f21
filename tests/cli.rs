//! The binary as an operator meets it: `kache dev`, the metrics listener, log formats.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::KacheRegistry;
use support::http::{get, request, try_request};

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn wait_for(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
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
    let (listen, metrics) = (free_addr(), free_addr());
    let log = cwd.path().join("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kache"))
        .args([
            "--log-format",
            "json",
            "dev",
            "--listen",
            &listen,
            "--metrics-listen",
            &metrics,
        ])
        .current_dir(cwd.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for(&format!("http://{listen}/v2/"));
    let r = request(
        "PUT",
        &format!("http://{listen}/v2/dev/manifests/v1"),
        &[("content-type", "application/vnd.oci.image.index.v1+json")],
        br#"{"schemaVersion":2,"manifests":[]}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(cwd.path().join("kache-data/index.redb").exists());
    let logs = std::fs::read_to_string(&log).unwrap();
    let first = logs.lines().next().expect("a log line");
    let v: serde_json::Value =
        serde_json::from_str(first).unwrap_or_else(|e| panic!("not JSON: {first}: {e}"));
    assert!(
        v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("kache dev")),
        "{first}"
    );
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
