//! AdmissionReviews over TLS against `kache webhook`, back to back and paced at the budget's
//! rate.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, header};

use super::{get_load, warm_up};
use crate::client::{self, Url};
use crate::load::{self, LoadResult, LoadSpec};
use crate::procs::Proc;
use crate::suite::Bench;
use crate::suite::meter::{Usage, median_by};
use crate::suite::report::{mib, thousands};
use crate::suite::servers::{ANY, Kind, Server, kache_command, wait_ready_tls};

/// The webhook budget's rate: its p99 is measured there.
const WEBHOOK_RATE: f64 = 5000.0;

/// AdmissionReviews over TLS against `kache webhook`.
pub async fn webhook_step(bench: &mut Bench<'_>) -> Result<()> {
    let Bench {
        o,
        work,
        kache,
        pids,
        meter,
        report,
        ..
    } = bench;
    if !o.wants("webhook") {
        return Ok(());
    }
    let dir = work.join("kache-webhook");
    std::fs::create_dir_all(&dir)?;
    let (ca, cert, key) = webhook_pki(&dir)?;
    let start = async |name: &'static str, extra: &[&str]| {
        let mut cmd = kache_command(kache);
        cmd.arg("webhook")
            .args(["--listen", ANY])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .args(["--metrics-listen", ANY])
            .args(extra);
        let (mut hook, bound) = Proc::spawn_kache(name, cmd, &dir, pids)?;
        let url = format!("https://{}/mutate", bound.addr("listen")?);
        wait_ready_tls(&mut hook, &url, Some(&ca)).await?;
        anyhow::Ok((hook, url))
    };
    let (mut hook, url) = start("kache-webhook", &[]).await?;
    let body = admission_review(false)?;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    // One answer checked by hand: a patch that points the images at the node proxy.
    let u = Url::parse(&url, Some(&ca))?;
    let (status, _, answer) =
        client::fetch(&u, Method::POST, &headers, client::full(body.clone())).await?;
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
    let patched = answer
        .pointer("/response/patch")
        .and_then(|p| p.as_str())
        .is_some_and(|p| !p.is_empty());
    if !status.is_success() || !patched {
        report.note(format!(
            "webhook: the review was answered {status} without a patch: {answer}"
        ));
    }
    let server = Server {
        kind: Kind::Webhook,
        label: "kache webhook",
        procs: vec![("webhook", hook.pid)],
        track_memory: true,
    };
    eprintln!(
        "webhook AdmissionReviews over TLS, {} connections",
        o.connections
    );
    let spec = LoadSpec {
        method: Method::POST,
        body: body.clone(),
        ..get_load(o, u, headers.clone())
    };
    warm_up(&spec).await?;
    let (r, u) = back_to_back(meter, &server, &spec, o.rounds).await?;
    report.note_errors("webhook", r.errors, &r.first_error);
    // Back to back, 32 connections keep the server saturated, and p99 is then the queue
    // they make (Little's law: 32 in flight at 10,000/s is 3.2 ms on average). The budget's
    // p99 is the latency at its own rate, so it is measured again at 5,000/s, open loop.
    let mut paced_rounds = Vec::new();
    for round in 0..o.rounds {
        let paced = LoadSpec {
            rate: Some(WEBHOOK_RATE),
            ..spec.clone()
        };
        let (p, u) = meter.measure(&server, load::load(paced)).await?;
        eprintln!(
            "  paced round {}: {:.0} reviews/s, p99 {:.2} ms, cpu {:.2} s",
            round + 1,
            p.rps(),
            p.ms(0.99),
            u.cpu_total()
        );
        paced_rounds.push((p, u));
    }
    let (p, pu) = median_by(paced_rounds, |(p, _)| p.ms(0.99));
    report.note_errors("webhook (paced)", p.errors, &p.first_error);
    hook.stop();

    // The same pod with pull secrets, to a webhook that adds the namespace's pull-token Secret
    // to them (privateImages, the chart's default).
    let (mut scoped_hook, url) = start(
        "kache-webhook-pull-secret",
        &["--pull-secret", "kache-pull"],
    )
    .await?;
    let scoped_body = admission_review(true)?;
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(scoped_body.len()));
    let scoped_url = Url::parse(&url, Some(&ca))?;
    let (status, _, answer) = client::fetch(
        &scoped_url,
        Method::POST,
        &headers,
        client::full(scoped_body.clone()),
    )
    .await?;
    let names_secret = status.is_success()
        && serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|a| a.pointer("/response/patch")?.as_str().map(str::to_owned))
            .and_then(|p| {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.decode(p).ok()
            })
            .is_some_and(|p| String::from_utf8_lossy(&p).contains("kache-pull"));
    if !names_secret {
        report.note(format!(
            "webhook --pull-secret: the review was answered {status} without adding kache-pull"
        ));
    }
    let server = Server {
        procs: vec![("webhook", scoped_hook.pid)],
        ..server
    };
    let spec = LoadSpec {
        method: Method::POST,
        body: scoped_body.clone(),
        ..get_load(o, scoped_url, headers)
    };
    warm_up(&spec).await?;
    eprintln!("webhook with --pull-secret, a pod with pull secrets");
    let (sr, su) = back_to_back(meter, &server, &spec, o.rounds).await?;
    report.note_errors("webhook --pull-secret", sr.errors, &sr.first_error);
    scoped_hook.stop();
    let _ = writeln!(
        report.md,
        "### Webhook: AdmissionReview POST /mutate over TLS (kept-alive connections), {} connections, {:?}\n",
        o.connections, o.duration
    );
    let _ = writeln!(
        report.md,
        "| review | reviews/s | p50 ms | p99 ms | max ms | errors | server CPU (cores) | CPU µs/review | peak RSS |"
    );
    let _ = writeln!(
        report.md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let review = format!(
        "pod of a ReplicaSet, 4 images ({} bytes){}",
        body.len(),
        if patched {
            ", answered with a patch"
        } else {
            ", **no patch**"
        }
    );
    webhook_row(&mut report.md, &review, &r, &u);
    let paced = format!(
        "the same, paced at {} reviews/s (open loop; a request sent late counts from its scheduled time)",
        thousands(WEBHOOK_RATE)
    );
    webhook_row(&mut report.md, &paced, &p, &pu);
    let scoped = format!(
        "the same pod with imagePullSecrets, to `--pull-secret kache-pull` ({} bytes){}; {:.2}x the first row's reviews/s",
        scoped_body.len(),
        if names_secret {
            ", kache-pull added"
        } else {
            ", **kache-pull not added**"
        },
        sr.rps() / r.rps().max(1.0)
    );
    webhook_row(&mut report.md, &scoped, &sr, &su);
    report.md.push('\n');
    report.budget(
        "webhook: ≥ 5,000 AdmissionReviews/s over TLS, p99 < 5 ms (at 5,000/s)",
        format!(
            "{} reviews/s back to back; at {} reviews/s p99 {:.2} ms (back to back: {:.2} ms)",
            thousands(r.rps()),
            thousands(p.rps()),
            p.ms(0.99),
            r.ms(0.99)
        ),
        patched && r.rps() >= WEBHOOK_RATE && p.rps() >= 0.98 * WEBHOOK_RATE && p.ms(0.99) < 5.0,
    );
    Ok(())
}

/// `spec` back to back against `server`, `rounds` times; the median round by rate.
async fn back_to_back(
    meter: &mut crate::suite::meter::Meter,
    server: &Server,
    spec: &LoadSpec,
    rounds: usize,
) -> Result<(LoadResult, Usage)> {
    let mut all = Vec::new();
    for round in 0..rounds {
        let (r, u) = meter.measure(server, load::load(spec.clone())).await?;
        eprintln!(
            "  round {}: {:.0} reviews/s, p99 {:.2} ms, cpu {:.2} s",
            round + 1,
            r.rps(),
            r.ms(0.99),
            u.cpu_total()
        );
        all.push((r, u));
    }
    Ok(median_by(all, |(r, _)| r.rps()))
}

/// A CA and a serving certificate for 127.0.0.1, as the webhook's cert-manager would make:
/// `(ca.pem, tls.crt, tls.key)` written into `dir`.
fn webhook_pki(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "kache-bench CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, "kache-bench webhook");
    let cert = leaf.signed_by(&key, &issuer)?;
    let paths = (dir.join("ca.pem"), dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&paths.0, ca_cert.pem())?;
    std::fs::write(&paths.1, cert.pem())?;
    std::fs::write(&paths.2, key.serialize_pem())?;
    Ok(paths)
}

/// What the API server sends when a Deployment's pod is created: four images to rewrite
/// (Docker Hub short name, a nested Docker Hub name, ghcr.io, registry.k8s.io), one of them an
/// init container; with `pull_secrets`, the pod names one.
fn admission_review(pull_secrets: bool) -> Result<Bytes> {
    let container = |name: &str, image: &str| {
        serde_json::json!({
            "name": name,
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
            "env": [{"name": "LOG_LEVEL", "value": "info"}],
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File",
        })
    };
    let review = serde_json::json!({
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": "0df28fbd-5f5f-11e8-bc74-36e6bb280816",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "groups": ["system:serviceaccounts", "system:authenticated"],
            },
            "object": {
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": {
                    "generateName": "web-7d9c8b6f5-",
                    "namespace": "shop",
                    "labels": {"app": "web", "pod-template-hash": "7d9c8b6f5"},
                    "ownerReferences": [{
                        "apiVersion": "apps/v1",
                        "kind": "ReplicaSet",
                        "name": "web-7d9c8b6f5",
                        "uid": "6f1e1f57-8c4d-4b8e-9a55-2f1d1f7b9c11",
                        "controller": true,
                        "blockOwnerDeletion": true,
                    }],
                },
                "spec": {
                    "initContainers": [container("migrate", "ghcr.io/shop/migrate:2.3.1")],
                    "containers": [
                        container("web", "nginx:1.27"),
                        container("app", "bitnami/redis:7.2"),
                        container("pause", "registry.k8s.io/pause:3.9"),
                    ],
                    "restartPolicy": "Always",
                    "dnsPolicy": "ClusterFirst",
                    "serviceAccountName": "default",
                    "enableServiceLinks": true,
                },
                "status": {},
            },
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        },
    });
    let mut review = review;
    if pull_secrets {
        review["request"]["object"]["spec"]["imagePullSecrets"] =
            serde_json::json!([{"name": "regcred"}]);
    }
    Ok(Bytes::from(serde_json::to_vec(&review)?))
}

/// One row of the webhook table.
fn webhook_row(md: &mut String, label: &str, r: &LoadResult, u: &Usage) {
    let _ = writeln!(
        md,
        "| {label} | {} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {:.0} | {} |",
        thousands(r.rps()),
        r.ms(0.5),
        r.ms(0.99),
        r.max_ms(),
        r.errors,
        u.cpu_total() / r.elapsed.as_secs_f64(),
        u.cpu_total() * 1e6 / r.ok.max(1) as f64,
        mib(u.peak.first().copied().unwrap_or(0)),
    );
}
