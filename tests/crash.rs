//! Crash safety: SIGKILL the registry in the middle of many concurrent uploads, restart it on
//! the same data dir, and check that every blob the index knows verifies, every acknowledged
//! upload is served whole, and nothing half-written is ever served.

use kache_testkit as support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use support::KacheRegistry;
use support::http::try_request;

const WRITERS: usize = 12;
/// Each writer stops after this many blobs even if the kill never comes.
const MAX_PER_WRITER: usize = 60;

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Deterministic bytes of 64 KiB to ~3 MiB, different per writer and round.
fn blob(writer: usize, round: usize) -> Vec<u8> {
    let mut x = (writer as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (round as u64 + 1);
    let len = 64 * 1024 + (x % (3 * 1024 * 1024)) as usize;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Pushes `bytes` either monolithically or in chunks; Ok(true) when the registry said 201.
fn push(base: &str, repo: &str, bytes: &[u8], chunked: bool) -> Result<bool, ureq::Error> {
    let d = digest_of(bytes);
    if !chunked {
        let r = try_request(
            "POST",
            &format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"),
            &[],
            bytes,
        )?;
        return Ok(r.status == 201);
    }
    let r = try_request(
        "POST",
        &format!("{base}/v2/{repo}/blobs/uploads/"),
        &[],
        &[],
    )?;
    let Some(mut loc) = r.header("location").map(str::to_owned) else {
        return Ok(false);
    };
    let mut offset = 0;
    for chunk in bytes.chunks(512 * 1024) {
        let range = format!("{}-{}", offset, offset + chunk.len() - 1);
        let r = try_request(
            "PATCH",
            &format!("{base}{loc}"),
            &[("content-range", &range)],
            chunk,
        )?;
        if r.status != 202 {
            return Ok(false);
        }
        loc = r.header("location").unwrap_or(&loc).to_owned();
        offset += chunk.len();
    }
    let r = try_request("PUT", &format!("{base}{loc}?digest={d}"), &[], &[])?;
    Ok(r.status == 201)
}

/// An upload tried: (writer, digest, length, whether the registry acknowledged it).
type Attempt = (usize, String, usize, bool);

#[test]
fn sigkill_during_concurrent_uploads_loses_and_corrupts_nothing() {
    let data = tempfile::tempdir().unwrap();
    let mut registry = KacheRegistry::start_with_internal(data.path(), &[] as &[&str]);
    let base = registry.internal_url();

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let log: Arc<Mutex<Vec<Attempt>>> = Arc::default();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (base, stop, acked, log) = (base.clone(), stop.clone(), acked.clone(), log.clone());
            std::thread::spawn(move || {
                for round in 0..MAX_PER_WRITER {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let bytes = blob(w, round);
                    let d = digest_of(&bytes);
                    let result = push(&base, &format!("crash/w{w}"), &bytes, round % 2 == 1);
                    let ok = matches!(result, Ok(true));
                    log.lock().unwrap().push((w, d, bytes.len(), ok));
                    if ok {
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    if result.is_err() {
                        // The registry was killed under us.
                        break;
                    }
                }
            })
        })
        .collect();

    // Kill once a good number of uploads completed, while the others are mid-flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::SeqCst) < 3 * WRITERS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    registry.kill9();
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    let log = log.lock().unwrap().clone();
    let acknowledged = log.iter().filter(|e| e.3).count();
    assert!(
        acknowledged >= 3 * WRITERS,
        "only {acknowledged} uploads completed before the kill"
    );
    assert!(
        log.iter().any(|e| !e.3),
        "the kill interrupted no upload; the test proves nothing"
    );

    // Offline check: repair, then re-hash every blob the index knows.
    let fsck = std::process::Command::new(env!("CARGO_BIN_EXE_kache"))
        .args(["fsck", "--data-dir"])
        .arg(data.path())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&fsck.stdout);
    assert!(
        fsck.status.success(),
        "fsck failed:\n{report}\n{}",
        String::from_utf8_lossy(&fsck.stderr)
    );
    assert!(!report.contains("BAD"), "{report}");
    assert_eq!(
        std::fs::read_dir(data.path().join("tmp")).unwrap().count(),
        0,
        "temp files survive recovery"
    );

    // Every acknowledged blob is served whole; an interrupted one is absent or whole.
    registry.restart();
    let base = registry.internal_url();
    for (w, d, len, ok) in &log {
        let r = try_request("GET", &format!("{base}/v2/crash/w{w}/blobs/{d}"), &[], &[]).unwrap();
        match r.status {
            200 => {
                assert_eq!(r.body.len(), *len, "{d} served with the wrong length");
                assert_eq!(
                    digest_of(&r.body),
                    *d,
                    "served bytes do not match their digest"
                );
            }
            404 => assert!(!ok, "acknowledged blob {d} was lost"),
            s => panic!("unexpected status {s} for {d}"),
        }
    }
}
