//! The Helm chart (helm/kache) with the real helm CLI: lint, schema and contradiction checks,
//! every value of the README's table rendered, and the rendered objects accepted by the API
//! servers of both Kubernetes versions of the test bed (server-side dry runs).
//! tests/helm_node.rs installs it on a real node.

use kache_testkit as support;

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Value, json};
use support::helm::{Helm, assert_release_gone, chart};
use support::kube::{KubeServer, Version, documents};

/// Value sets that exercise each branch of the templates.
const VARIANTS: &[&[&str]] = &[
    &[],
    &["--set", "registry.writeAccess=token"],
    // An emptyDir store is collected on schedule like any other.
    &[
        "--set",
        "registry.persistence.enabled=false",
        "--set",
        "registry.emptyDirSizeLimit=10Gi",
    ],
    &["--set", "proxy.hostNetwork=false"],
    &[
        "--set",
        "registry.hostNetwork=true,webhook.hostNetwork=true,controller.hostNetwork=true",
    ],
    &[
        "--set",
        "metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true",
    ],
    &["--set", "controller.precacheKinds=null"],
    &["--set", "privateImages.privateRegistries={ghcr.io}"],
    &["--set", "privateImages.enabled=false"],
];

fn chart_path() -> String {
    chart().to_str().expect("UTF-8 path").to_owned()
}

/// Everything `kache certs` writes, for installs without cert-manager: `--set` arguments with
/// the CA bundle, and the Secret holding the pair.
fn provided_tls(dir: &Path, ns: &str) -> (Vec<String>, Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kache"))
        .args(["certs", "--out"])
        .arg(dir)
        .args([
            "--dns",
            &format!("kache-webhook.{ns}.svc"),
            "--dns",
            &format!("kache-webhook.{ns}.svc.cluster.local"),
        ])
        .output()
        .expect("run kache certs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect(f);
    let ca = dir.join("ca.crt");
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "kache-webhook-provided", "namespace": ns},
        "stringData": {"tls.crt": read("tls.crt"), "tls.key": read("tls.key")},
    });
    (
        vec![
            "--set".into(),
            "certManager.enabled=false".into(),
            "--set".into(),
            "webhook.tls.existingSecret=kache-webhook-provided".into(),
            "--set-file".into(),
            format!("webhook.tls.caBundle={}", ca.display()),
        ],
        secret,
    )
}

#[test]
fn the_chart_lints_clean_with_every_kind_of_values() {
    let helm = Helm::offline();
    let dir = tempfile::tempdir().unwrap();
    let (tls, _) = provided_tls(dir.path(), "kache");
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    for variant in VARIANTS.iter().copied().chain([tls.as_slice()]) {
        let mut args = vec!["lint", "--strict", "--quiet"];
        let chart = chart_path();
        args.push(&chart);
        args.extend_from_slice(variant);
        let out = helm.ok(&args);
        assert!(
            !out.contains("[WARNING]") && !out.contains("[ERROR]") && !out.contains("[INFO]"),
            "helm lint {variant:?}:\n{out}"
        );
        // And it renders, with every object named and labelled.
        let objects = documents(&helm.template(variant));
        assert!(objects.len() > 20, "{variant:?}: {} objects", objects.len());
        for o in &objects {
            assert!(
                o["metadata"]["labels"]["app.kubernetes.io/instance"] == "kache",
                "{variant:?}: unlabelled {o}"
            );
        }
    }
}

#[test]
fn contradictory_or_invalid_values_fail_before_anything_is_applied() {
    let helm = Helm::offline();
    let chart = chart_path();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--set", "certManager.enabled=false"],
            "certManager.enabled=false needs webhook.tls.existingSecret",
        ),
        (
            &["--set", "webhook.tls.existingSecret=mine"],
            "webhook.tls.* is set but certManager.enabled=true",
        ),
        (
            &[
                "--set",
                "registry.persistence.enabled=false",
                "--set",
                "registry.persistence.existingClaim=data",
            ],
            "registry.persistence.existingClaim is set but registry.persistence.enabled=false",
        ),
        (
            &["--set", "registry.emptyDirSizeLimit=1Gi"],
            "registry.emptyDirSizeLimit applies only without persistence",
        ),
        (
            &["--set", "controller.registryURL=http://elsewhere:5000"],
            "must reach the registry's internal port 5001",
        ),
        (
            &["--set", "registry.internalPort=5000"],
            "registry.port, registry.internalPort and registry.metricsPort must differ",
        ),
        (
            &["--set", "webhook.replicas=1"],
            "webhook.podDisruptionBudget.minAvailable must be below webhook.replicas",
        ),
        (
            &["--set", "controller.replicas=1"],
            "controller.podDisruptionBudget.minAvailable must be below controller.replicas",
        ),
        (
            &["--set", "proxy.metricsPort=7439"],
            "proxy.metricsPort and proxy.port are the same port",
        ),
        // The schema: names, types, enumerations and formats.
        (
            &["--set", "registry.writeAccess=open"],
            "at '/registry/writeAccess': value must be one of 'networkPolicy', 'token'",
        ),
        (
            &["--set", "proxy.httpServer=splice"],
            "at '/proxy/httpServer'",
        ),
        (
            &["--set", "proxy.hostnetwork=true"],
            "'hostnetwork' not allowed",
        ),
        (&["--set", "webhook.replicas=0"], "at '/webhook/replicas'"),
        (&["--set", "proxy.port=70000"], "at '/proxy/port'"),
        (&["--set", "registry.tagTTL=soon"], "at '/registry/tagTTL'"),
        (
            &["--set", "registry.revalidateWait=2"],
            "at '/registry/revalidateWait'",
        ),
        (
            &["--set", "registry.gc.schedule=daily"],
            "at '/registry/gc/schedule'",
        ),
        (
            &["--set", "registry.maxSize=lots"],
            "at '/registry/maxSize'",
        ),
        (
            &["--set", "controller.precacheKinds={pods}"],
            "at '/controller/precacheKinds/0'",
        ),
        (&["--set", "image.digest=latest"], "at '/image/digest'"),
    ];
    for (args, want) in cases {
        let mut all = vec!["template", "kache", &chart, "-n", "kache"];
        all.extend_from_slice(args);
        let err = helm.fails(&all);
        assert!(err.contains(want), "{args:?}: wanted {want:?} in:\n{err}");
    }
}

/// The arguments of the first container of the workload `kind/name` in rendered `objects`.
fn container_args(objects: &[Value], kind: &str, name: &str) -> Vec<String> {
    let o = objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"));
    o["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

/// The flags that make the caching policy.
const POLICY_FLAGS: &[&str] = &[
    "--proxy-port=",
    "--ignore-namespace=",
    "--object-selector=",
    "--ignore-registry=",
    "--accept=",
    "--skip-mutable",
    "--pull-secret=",
];

#[test]
fn the_webhook_and_the_controller_are_given_one_caching_policy() {
    let helm = Helm::offline();
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.json");
    std::fs::write(
        &values,
        json!({
            "proxy": {"port": 7500, "metricsPort": 7501},
            "webhook": {
                "ignoredNamespaces": ["batch", "kube-system"],
                "objectSelector": {"matchExpressions": [
                    {"key": "team", "operator": "NotIn", "values": ["infra", "ops"]},
                    {"key": "tier", "operator": "Exists"},
                ]},
                "ignoredRegistries": ["*.internal", "regex:^quay\\.io$"],
                "acceptedImages": ["docker.io/library/*"],
                "skipMutableTags": true,
            },
            "privateImages": {"secretName": "team-pull"},
        })
        .to_string(),
    )
    .unwrap();
    let objects = documents(&helm.template(&["-f", values.to_str().unwrap()]));
    let policy = |args: Vec<String>| -> Vec<String> {
        args.into_iter()
            .filter(|a| POLICY_FLAGS.iter().any(|f| a.starts_with(f)))
            .collect()
    };
    let webhook = policy(container_args(&objects, "Deployment", "kache-webhook"));
    let controller = policy(container_args(&objects, "Deployment", "kache-controller"));
    assert_eq!(webhook, controller);
    assert_eq!(
        webhook,
        [
            "--proxy-port=7500",
            "--ignore-namespace=kube-system",
            "--ignore-namespace=kache",
            "--ignore-namespace=batch",
            r#"--object-selector={"matchExpressions":[{"key":"team","operator":"NotIn","values":["infra","ops"]},{"key":"tier","operator":"Exists"}]}"#,
            "--ignore-registry=*.internal",
            "--ignore-registry=regex:^quay\\.io$",
            "--accept=docker.io/library/*",
            "--skip-mutable",
            "--pull-secret=team-pull",
        ]
    );
    // The webhook configuration asks the API server for the same namespaces and selector.
    let config = objects
        .iter()
        .find(|o| o["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    let hook = &config["webhooks"][0];
    assert_eq!(
        hook["namespaceSelector"]["matchExpressions"][0]["values"],
        json!(["kube-system", "kache", "batch"])
    );
    assert_eq!(
        hook["objectSelector"]["matchExpressions"],
        json!([
            {"key": "kache.io/image-caching-policy", "operator": "NotIn", "values": ["ignore"]},
            {"key": "team", "operator": "NotIn", "values": ["infra", "ops"]},
            {"key": "tier", "operator": "Exists"},
        ])
    );
    // And both roles read them: each starts past its flags and stops only where it needs a
    // cluster (the controller) or a certificate (the webhook); a selector the API server would
    // refuse stops both at once, saying why.
    let run = |role: &str, policy: &[String]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kache"));
        cmd.arg(role)
            .args(policy)
            .env("KUBECONFIG", dir.path().join("absent"))
            .env_remove("KUBERNETES_SERVICE_HOST");
        if role == "webhook" {
            cmd.args([
                "--tls-cert",
                "/absent/tls.crt",
                "--tls-key",
                "/absent/tls.key",
            ]);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run("webhook", &webhook).contains("serving certificate"));
    assert!(run("controller", &controller).contains("Kubernetes API"));
    let bad: Vec<String> = webhook
        .iter()
        .map(|a| match a.starts_with("--object-selector=") {
            true => {
                r#"--object-selector={"matchExpressions":[{"key":"team","operator":"Is"}]}"#.into()
            }
            false => a.clone(),
        })
        .collect();
    for role in ["webhook", "controller"] {
        let err = run(role, &bad);
        assert!(
            err.contains("--object-selector") && err.contains("\"Is\""),
            "{err}"
        );
    }

    // Defaults: the cluster's own namespace and the release's, nothing else; private images
    // scoped.
    let objects = documents(&helm.template(&[]));
    assert_eq!(
        policy(container_args(&objects, "Deployment", "kache-controller")),
        [
            "--proxy-port=7439",
            "--ignore-namespace=kube-system",
            "--ignore-namespace=kache",
            "--pull-secret=kache-pull",
        ]
    );
}

#[test]
fn an_empty_dir_store_is_kept_below_its_size_limit() {
    let helm = Helm::offline();
    let registry_args = |args: &[&str]| {
        let objects = documents(&helm.template(args));
        container_args(&objects, "StatefulSet", "kache-registry")
    };
    let max_size = |args: Vec<String>| -> Option<String> {
        args.into_iter()
            .find_map(|a| a.strip_prefix("--max-size=").map(str::to_owned))
    };
    let off = ["--set", "registry.persistence.enabled=false"];
    for (limit, want) in [
        ("10Gi", "9663676416"),
        ("500Mi", "471859200"),
        ("1.5G", "1350000000"),
        ("2000", "1800"),
    ] {
        let limit = format!("registry.emptyDirSizeLimit={limit}");
        let args = registry_args(&[off[0], off[1], "--set-string", &limit]);
        assert_eq!(max_size(args).as_deref(), Some(want), "{limit}");
    }
    // A cap of the user's own wins; without a limit there is none.
    let args = registry_args(&[
        off[0],
        off[1],
        "--set",
        "registry.emptyDirSizeLimit=10Gi,registry.maxSize=5Gi",
    ]);
    assert_eq!(max_size(args).as_deref(), Some("5Gi"));
    assert_eq!(max_size(registry_args(&off)), None);
    // And the store is an emptyDir of that limit, with the schedule still on.
    let objects =
        documents(&helm.template(&[off[0], off[1], "--set", "registry.emptyDirSizeLimit=10Gi"]));
    let sts = objects.iter().find(|o| o["kind"] == "StatefulSet").unwrap();
    let data = sts["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "data")
        .unwrap();
    assert_eq!(data["emptyDir"]["sizeLimit"], "10Gi");
    assert!(sts["spec"].get("volumeClaimTemplates").is_none());
    assert!(registry_args(&off).contains(&"--gc-schedule=0 3 * * *".to_owned()));
}

/// The README's values table: every row's key, in order.
fn readme_values() -> Vec<String> {
    let readme = std::fs::read_to_string(chart().join("../../README.md")).expect("README.md");
    let section = readme
        .split("### Values")
        .nth(1)
        .expect("a Values section in the README");
    section
        .lines()
        .skip_while(|l| !l.starts_with("| value"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.split('|')
                .nth(1)
                .expect("a key cell")
                .trim()
                .trim_matches('`')
                .to_owned()
        })
        .collect()
}

/// The leaves of values.yaml (a map or list is a leaf when it is empty, or a list, or the
/// chart passes it through whole).
fn value_keys(v: &Value, prefix: &str, out: &mut Vec<String>) {
    const WHOLE: &[&str] = &[
        "resources",
        "affinity",
        "nodeSelector",
        "labels",
        "annotations",
        "podLabels",
        "podAnnotations",
        "commonLabels",
        "issuerRef",
        "updateStrategy",
        "objectSelector",
    ];
    match v {
        Value::Object(m)
            if !m.is_empty() && !WHOLE.contains(&prefix.rsplit('.').next().unwrap_or("")) =>
        {
            for (k, x) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                value_keys(x, &p, out);
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

/// A value different from `default` for `key`, valid for the schema, and the other values it
/// needs in order to show in the output.
fn changed(key: &str, default: &Value) -> (Value, Vec<&'static str>) {
    let special: Option<(Value, Vec<&'static str>)> = match key {
        "image.pullPolicy" => Some((json!("Always"), vec![])),
        // One more would collide with the next port (a contradiction of its own).
        "proxy.port" | "registry.port" => Some((json!(default.as_u64().unwrap() + 500), vec![])),
        "image.digest" => Some((json!(format!("sha256:{}", "ab".repeat(32))), vec![])),
        "imagePullSecrets" => Some((json!([{"name": "pull"}]), vec![])),
        "logFormat" => Some((json!("text"), vec![])),
        "registry.writeAccess" => Some((json!("token"), vec![])),
        "registry.service.type" => Some((json!("NodePort"), vec![])),
        "proxy.httpServer" => Some((json!("hyper"), vec![])),
        "registry.gc.schedule" => Some((json!("0 4 * * *"), vec![])),
        "registry.gc.cpu" => Some((json!("20%"), vec![])),
        "registry.minFree" => Some((json!("10Gi"), vec![])),
        "registry.maxSize" => Some((json!("100Gi"), vec![])),
        "registry.persistence.size" => Some((json!("7Gi"), vec![])),
        "registry.emptyDirSizeLimit" => {
            Some((json!("7Gi"), vec!["registry.persistence.enabled=false"]))
        }
        "registry.persistence.accessModes" => Some((json!(["ReadWriteOncePod"]), vec![])),
        "registry.persistence.storageClass" => Some((json!("fast"), vec![])),
        "registry.persistence.enabled" => Some((json!(false), vec![])),
        "certManager.enabled" => Some((
            json!(false),
            vec![
                "webhook.tls.existingSecret=mine",
                "webhook.tls.caBundle=PEM",
            ],
        )),
        "webhook.tls.existingSecret" => Some((
            json!("other"),
            vec!["certManager.enabled=false", "webhook.tls.caBundle=PEM"],
        )),
        "webhook.tls.caBundle" => Some((
            json!("OTHER"),
            vec![
                "certManager.enabled=false",
                "webhook.tls.existingSecret=mine",
            ],
        )),
        "certManager.issuerRef" => Some((json!({"name": "corp", "kind": "ClusterIssuer"}), vec![])),
        "privateImages.keySecret" => Some((json!("mine"), vec![])),
        "privateImages.secretName" => Some((json!("kache-token"), vec![])),
        "privateImages.grantTTL" | "privateImages.grantRenewal" => Some((json!("17m"), vec![])),
        "privateImages.privateRegistries" => Some((json!(["x.example"]), vec![])),
        "proxy.updateStrategy" => Some((json!({"type": "OnDelete"}), vec![])),
        "webhook.objectSelector" => Some((
            json!({"matchExpressions": [{"key": "team", "operator": "Exists"}]}),
            vec![],
        )),
        "controller.precacheKinds" => Some((json!(["deployments"]), vec![])),
        "controller.registryURL" => Some((json!("http://elsewhere:5001"), vec![])),
        "proxy.registryURL" => Some((json!("http://elsewhere:5000"), vec![])),
        "upstream.caBundle" => Some((json!("PEM"), vec![])),
        "fullnameOverride" => Some((json!("cache"), vec![])),
        "nodeImageSets" => Some((
            json!([{"name": "ci", "images": ["x.example/a:1"], "nodeSelector": {"pool": "ci"}}]),
            vec![],
        )),
        "metrics.serviceMonitor.interval" | "metrics.serviceMonitor.labels" => Some((
            if key.ends_with("interval") {
                json!("1m")
            } else {
                json!({"a": "b"})
            },
            vec!["metrics.serviceMonitor.enabled=true"],
        )),
        "metrics.podMonitor.interval" | "metrics.podMonitor.labels" => Some((
            if key.ends_with("interval") {
                json!("1m")
            } else {
                json!({"a": "b"})
            },
            vec!["metrics.podMonitor.enabled=true"],
        )),
        k if k.ends_with("podDisruptionBudget.minAvailable") => Some((json!(0), vec![])),
        k if k.ends_with(".tolerations") => {
            Some((json!([{"key": "k", "operator": "Exists"}]), vec![]))
        }
        k if k.ends_with(".extraEnv") => Some((json!([{"name": "A", "value": "b"}]), vec![])),
        k if k.ends_with(".affinity") => Some((
            json!({"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "preference": {"matchExpressions": [{"key": "k", "operator": "Exists"}]}}]}}),
            vec![],
        )),
        k if k.ends_with(".resources") => Some((json!({"requests": {"cpu": "1"}}), vec![])),
        k if k.ends_with(".timeout")
            || k.ends_with("TTL")
            || k.ends_with("Timeout")
            || k.ends_with("Delay")
            || k.ends_with("Wait")
            || k.ends_with(".resync")
            || k.ends_with(".grace")
            || k.ends_with("Duration")
            || k.ends_with(".duration")
            || k.ends_with("renewBefore") =>
        {
            Some((json!("17m"), vec![]))
        }
        _ => None,
    };
    if let Some(s) = special {
        return s;
    }
    let v = match default {
        Value::Bool(b) => json!(!b),
        Value::Number(n) => json!(n.as_u64().expect("a count or a port") + 1),
        Value::String(s) => json!(format!("{s}x")),
        Value::Array(_) => json!(["x.example"]),
        Value::Object(_) => json!({"x": "y"}),
        Value::Null => json!("x"),
    };
    (v, vec![])
}

#[test]
fn every_value_in_the_readme_table_is_in_the_chart_and_changes_what_it_renders() {
    let values: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap())
            .unwrap();
    let mut keys = Vec::new();
    value_keys(&values, "", &mut keys);
    let table = readme_values();
    let (have, want): (BTreeSet<_>, BTreeSet<_>) = (
        table.iter().cloned().collect(),
        keys.iter().cloned().collect(),
    );
    assert_eq!(
        have.symmetric_difference(&want).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "the README's values table and values.yaml differ"
    );
    assert_eq!(
        table.len(),
        have.len(),
        "a key is twice in the README's table"
    );

    let helm = Helm::offline();
    let dir = tempfile::tempdir().unwrap();
    let base = helm.template(&[]);
    for key in &keys {
        let default = key.split('.').fold(&values, |v, k| &v[k]);
        let (value, needs) = changed(key, default);
        let file = dir.path().join("values.json");
        // A JSON values file sets any type exactly (`--set` guesses types).
        let mut doc = json!({});
        {
            let mut at = &mut doc;
            let parts: Vec<&str> = key.split('.').collect();
            for p in &parts[..parts.len() - 1] {
                at = at
                    .as_object_mut()
                    .unwrap()
                    .entry(p.to_string())
                    .or_insert(json!({}));
            }
            at[parts[parts.len() - 1]] = value.clone();
        }
        std::fs::write(&file, doc.to_string()).unwrap();
        let mut context = Vec::new();
        for n in &needs {
            context.extend(["--set", n]);
        }
        // What the chart renders with the context alone (the defaults, when the context is
        // only valid together with the value, as certManager.enabled=false is).
        let without = if needs.is_empty() {
            base.clone()
        } else {
            let chart = chart_path();
            let mut args = vec!["template", "kache", &chart, "-n", "kache"];
            args.extend_from_slice(&context);
            let out = helm.run(&args);
            if out.status.success() {
                String::from_utf8(out.stdout).unwrap()
            } else {
                base.clone()
            }
        };
        let mut args = context.clone();
        args.extend(["-f", file.to_str().unwrap()]);
        let with = helm.template(&args);
        assert_ne!(
            with, without,
            "{key}={value} changes nothing in the chart's output"
        );
    }
}

/// The rendered chart, created as a server-side dry run on a real API server (admission,
/// defaulting and strict field validation, nothing stored): on 1.20 without cert-manager (as a
/// current cert-manager does not run there) and on the current version with cert-manager's
/// CRDs installed.
#[test]
fn the_api_server_accepts_the_rendered_chart_on_both_versions() {
    for version in Version::ALL {
        let kube = KubeServer::start(version);
        let helm = Helm::new(&kube);
        kube.namespace("kache");
        kube.apply_yaml(include_str!("../crates/api/crds.yaml"));
        let dir = tempfile::tempdir().unwrap();
        let (tls, secret) = provided_tls(dir.path(), "kache");
        kube.ok("POST", "/api/v1/namespaces/kache/secrets", Some(&secret));
        default_storage_class(&kube);
        let mut variants: Vec<Vec<String>> = VARIANTS
            .iter()
            // The Prometheus Operator's kinds are not served here.
            .filter(|v| !v.iter().any(|a| a.contains("Monitor")))
            .map(|v| v.iter().map(|a| a.to_string()).collect())
            .collect();
        match version {
            Version::Oldest => {
                for v in &mut variants {
                    v.extend(tls.iter().cloned());
                }
            }
            Version::Current => {
                let cm = kube.cert_manager.join("chart");
                kube.apply_yaml(&helm.ok(&[
                    "template",
                    "cert-manager",
                    cm.to_str().unwrap(),
                    "-n",
                    "cert-manager",
                    "--set",
                    "installCRDs=true",
                    "--show-only",
                    "templates/crds.yaml",
                ]));
                variants.push(tls.clone());
            }
        }
        for variant in &variants {
            let chart = chart_path();
            let mut args = vec![
                "template",
                "kache",
                &chart,
                "-n",
                "kache",
                "--dry-run=server",
            ];
            args.extend(variant.iter().map(String::as_str));
            let rendered = helm.ok(&args);
            // The capabilities came from this server: policy/v1 is served from 1.21.
            let pdb = match version {
                Version::Oldest => "apiVersion: policy/v1beta1",
                Version::Current => "apiVersion: policy/v1\n",
            };
            assert!(rendered.contains(pdb), "{version:?}: no {pdb}");
            let refused = kube.dry_run_yaml(&rendered);
            assert!(
                refused.is_empty(),
                "{version:?} {variant:?}: the API server refused:\n{}",
                refused.join("\n")
            );
        }
    }
}

/// A StorageClass marked as the cluster's default, as most clusters have one (it provisions
/// nothing: no claim is bound here).
fn default_storage_class(kube: &KubeServer) {
    kube.ok(
        "POST",
        "/apis/storage.k8s.io/v1/storageclasses",
        Some(&json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": "standard", "annotations": {
                "storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": "kubernetes.io/no-provisioner",
            "volumeBindingMode": "WaitForFirstConsumer",
        })),
    );
}

/// On 1.20 (the oldest version kache supports, where current cert-manager releases do not run)
/// the chart installs with a certificate from `kache certs`, upgrades and uninstalls through a
/// real API server, without root and without a node (tests/helm_node.rs adds the node).
#[test]
fn helm_installs_upgrades_and_uninstalls_on_the_oldest_version() {
    let kube = KubeServer::start(Version::Oldest);
    let helm = Helm::new(&kube);
    kube.namespace("kache");
    let dir = tempfile::tempdir().unwrap();
    let (tls, secret) = provided_tls(dir.path(), "kache");
    kube.ok("POST", "/api/v1/namespaces/kache/secrets", Some(&secret));
    let chart = chart_path();
    let mut args = vec!["install", "kache", &chart, "-n", "kache"];
    args.extend(tls.iter().map(String::as_str));
    // No StorageClass: the claim could never bind, and the install says so at once, creating
    // nothing (rather than waiting for a Pending claim until it times out).
    let err = helm.fails(&args);
    assert!(
        err.contains("the cluster has no default StorageClass")
            && err.contains("registry.persistence.enabled=false"),
        "{err}"
    );
    assert_release_gone(&kube, &["/apis/apps/v1/namespaces/kache/statefulsets"]);
    assert_eq!(
        kube.request(
            "GET",
            "/api/v1/namespaces/kache/secrets/sh.helm.release.v1.kache.v1",
            None
        )
        .0,
        404
    );
    default_storage_class(&kube);
    helm.ok(&args);

    let crd = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/cachedimages.kache.io";
    assert_eq!(kube.request("GET", crd, None).0, 200, "the chart's CRD");
    assert_eq!(
        kube.webhook_ca_bundle("kache"),
        std::fs::read_to_string(dir.path().join("ca.crt")).unwrap()
    );
    let ds = kube.ok(
        "GET",
        "/apis/apps/v1/namespaces/kache/daemonsets/kache-proxy",
        None,
    );
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1,
        "no surge updates before 1.22: {}",
        ds["spec"]["updateStrategy"]
    );
    kube.ok(
        "GET",
        "/apis/policy/v1beta1/namespaces/kache/poddisruptionbudgets/kache-webhook",
        None,
    );

    let mut args = vec!["upgrade", "kache", &chart, "-n", "kache", "--reuse-values"];
    args.extend(["--set", "logFormat=text"]);
    helm.ok(&args);
    let webhook = kube.ok(
        "GET",
        "/apis/apps/v1/namespaces/kache/deployments/kache-webhook",
        None,
    );
    assert!(
        webhook["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .contains(&json!("--log-format=text")),
        "{webhook}"
    );

    helm.ok(&["uninstall", "kache", "-n", "kache", "--wait"]);
    let collections = [
        "/apis/apps/v1/namespaces/kache/statefulsets",
        "/apis/apps/v1/namespaces/kache/deployments",
        "/apis/apps/v1/namespaces/kache/daemonsets",
        "/api/v1/namespaces/kache/services",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
    ];
    assert_release_gone(&kube, &collections);
    assert_eq!(
        kube.request("GET", crd, None).0,
        200,
        "the CRD went with the release"
    );
}
