//! Tests of the rewrite rules, on whole pods and the patches applied to them.

use super::*;
use k8s_openapi::api::core::v1::{Container, EphemeralContainer, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn pod(images: &[(&str, &str, Option<&str>)]) -> Pod {
    Pod {
        metadata: ObjectMeta::default(),
        spec: Some(PodSpec {
            containers: images
                .iter()
                .map(|(name, image, policy)| Container {
                    name: (*name).into(),
                    image: Some((*image).into()),
                    image_pull_policy: policy.map(Into::into),
                    ..Container::default()
                })
                .collect(),
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// The image of container 0 after applying the patch, or `None` when it is unchanged.
fn rewritten(image: &str, policy: &Policy) -> Option<String> {
    rewritten_with(image, None, policy)
}

fn rewritten_with(image: &str, pull: Option<&str>, policy: &Policy) -> Option<String> {
    let p = pod(&[("app", image, pull)]);
    let r = rewrite(&p, policy, Scope::Create);
    if r.rewritten == 0 {
        assert!(r.patch.0.is_empty());
        return None;
    }
    let mut doc = serde_json::to_value(&p).unwrap();
    json_patch::patch(&mut doc, &r.patch).unwrap();
    Some(doc["spec"]["containers"][0]["image"].as_str()?.to_owned())
}

#[test]
fn rewrites_to_the_proxy() {
    let p = Policy::default();
    let d = format!("sha256:{HEX}");
    let cases = [
        (
            "nginx",
            "localhost:7439/docker.io/library/nginx:latest".to_owned(),
        ),
        (
            "nginx:1.27",
            "localhost:7439/docker.io/library/nginx:1.27".into(),
        ),
        ("ghcr.io/o/a:1", "localhost:7439/ghcr.io/o/a:1".into()),
        (
            &format!("registry:5000/x@{d}"),
            format!("localhost:7439/registry_5000/x@{d}"),
        ),
        (
            &format!("nginx:1.27@{d}"),
            format!("localhost:7439/docker.io/library/nginx:1.27@{d}"),
        ),
        (
            "index.docker.io/bitnami/redis:7",
            "localhost:7439/docker.io/bitnami/redis:7".into(),
        ),
    ];
    for (image, want) in cases {
        assert_eq!(
            rewritten(image, &p).as_deref(),
            Some(want.as_str()),
            "{image}"
        );
    }
    let other_port = Policy {
        proxy_port: 17439,
        ..Policy::default()
    };
    assert_eq!(
        rewritten("nginx", &other_port).as_deref(),
        Some("localhost:17439/docker.io/library/nginx:latest")
    );
}

#[test]
fn leaves_alone() {
    let p = Policy::default();
    for image in [
        "localhost:7439/docker.io/library/nginx:latest",
        "127.0.0.1:7439/ghcr.io/o/a:1",
        "[::1]:7439/ghcr.io/o/a:1",
        "localhost:5000/team/app:1",
        "127.0.0.1:5000/app",
        "localhost/app",
    ] {
        assert_eq!(rewritten(image, &p), None, "{image}");
    }
    assert_eq!(rewritten_with("nginx:1", Some("Never"), &p), None);
    assert!(rewritten_with("nginx:1", Some("IfNotPresent"), &p).is_some());
    // Not the proxy: another port on localhost is a node-local registry, left alone too.
    let r = rewrite(
        &pod(&[("a", "localhost:7440/docker.io/x", None)]),
        &p,
        Scope::Create,
    );
    assert_eq!(r.skipped[0].reason, SkipReason::LocalRegistry);
}

#[test]
fn warns_about_what_it_cannot_rewrite() {
    let p = Policy::default();
    let long = format!("ghcr.io/{}:1", "a".repeat(240));
    let r = rewrite(
        &pod(&[
            ("up", "Nginx", None),
            ("long", &long, None),
            ("ok", "nginx", None),
        ]),
        &p,
        Scope::Create,
    );
    assert_eq!(r.rewritten, 1);
    let reasons: Vec<_> = r.skipped.iter().map(|s| s.reason).collect();
    assert_eq!(reasons, [SkipReason::Unparsable, SkipReason::TooLong]);
    assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
    assert!(r.warnings[0].contains("\"up\"") && r.warnings[0].contains("lowercase"));
    assert!(r.warnings[1].contains("\"long\"") && r.warnings[1].contains("255"));
    let r = rewrite(
        &pod(&[("x", &format!("{}:1", "A".repeat(300)), None)]),
        &p,
        Scope::Create,
    );
    assert!(r.warnings[0].len() <= MAX_WARNING && r.warnings[0].ends_with('…'));
}

#[test]
fn policy_patterns() {
    let with = |ignore: &[&str], accept: &[&str]| Policy {
        ignore_registries: ignore
            .iter()
            .map(|p| Pattern::registry(p).unwrap())
            .collect(),
        accept: accept.iter().map(|p| Pattern::image(p).unwrap()).collect(),
        ..Policy::default()
    };
    let p = with(&["quay.io", "*.internal", "Index.Docker.IO"], &[]);
    assert_eq!(rewritten("quay.io/a/b", &p), None);
    assert_eq!(rewritten("reg.corp.internal:5000/a", &p), None);
    assert_eq!(rewritten("nginx", &p), None, "docker.io aliases normalise");
    assert!(rewritten("ghcr.io/a/b", &p).is_some());
    assert!(
        rewritten("quay.io.evil.com/a", &p).is_some(),
        "globs match whole"
    );

    let p = with(
        &[],
        &[
            "*.example.com",
            "docker.io/library/*",
            "regex:^ghcr\\.io/o/.*:v[0-9]+$",
        ],
    );
    assert!(rewritten("reg.example.com/x", &p).is_some());
    assert!(rewritten("nginx", &p).is_some());
    assert!(rewritten("ghcr.io/o/a:v1", &p).is_some());
    assert_eq!(rewritten("ghcr.io/o/a:latest", &p), None);
    assert_eq!(rewritten("bitnami/redis", &p), None);
    assert_eq!(rewritten("example.com/x", &p), None);

    let r = rewrite(
        &pod(&[("a", "quay.io/x", None)]),
        &with(&[], &["ghcr.io"]),
        Scope::Create,
    );
    assert_eq!(r.skipped[0].reason, SkipReason::NotAccepted);
    assert!(r.warnings.is_empty(), "policy is not a warning");
    assert!(Pattern::image("regex:(").is_err());
}

#[test]
fn skip_mutable() {
    let p = Policy {
        skip_mutable: true,
        ..Policy::default()
    };
    assert_eq!(rewritten("nginx", &p), None);
    assert_eq!(rewritten("nginx:latest", &p), None);
    assert_eq!(rewritten_with("nginx:1.27", Some("Always"), &p), None);
    assert!(rewritten_with("nginx:1.27", Some("IfNotPresent"), &p).is_some());
    assert!(rewritten(&format!("nginx@sha256:{HEX}"), &p).is_some());
    assert!(rewritten_with(&format!("nginx:latest@sha256:{HEX}"), Some("Always"), &p).is_some());
    assert!(
        rewritten("nginx", &Policy::default()).is_some(),
        "off by default"
    );
}

#[test]
fn opt_out_label() {
    let mut p = pod(&[("a", "nginx", None)]);
    p.metadata.labels = Some([(POLICY_LABEL.to_owned(), "ignore".to_owned())].into());
    let r = rewrite(&p, &Policy::default(), Scope::Create);
    assert!(r.patch.0.is_empty() && r.warnings.is_empty() && r.skipped.is_empty());
    assert_eq!(r.pod_skipped, Some(PodSkip::OptedOut));
}

#[test]
fn ephemeral_update_touches_only_new_ephemeral_containers() {
    let mut old = pod(&[("app", "nginx", None)]);
    let e = |name: &str, image: &str| EphemeralContainer {
        name: name.into(),
        image: Some(image.into()),
        ..EphemeralContainer::default()
    };
    old.spec.as_mut().unwrap().ephemeral_containers = Some(vec![e("debug1", "busybox")]);
    let mut new = old.clone();
    new.spec
        .as_mut()
        .unwrap()
        .ephemeral_containers
        .as_mut()
        .unwrap()
        .push(e("debug2", "busybox:1.36"));
    let r = rewrite(
        &new,
        &Policy::default(),
        Scope::EphemeralUpdate { old: &old },
    );
    assert_eq!(r.rewritten, 1);
    let mut doc = serde_json::to_value(&new).unwrap();
    json_patch::patch(&mut doc, &r.patch).unwrap();
    let spec = &doc["spec"];
    assert_eq!(spec["containers"][0]["image"], "nginx");
    assert_eq!(spec["ephemeralContainers"][0]["image"], "busybox");
    assert_eq!(
        spec["ephemeralContainers"][1]["image"],
        "localhost:7439/docker.io/library/busybox:1.36"
    );
    assert_eq!(
        doc["metadata"]["annotations"]["original-image.kache.io/e.debug2"],
        "busybox:1.36"
    );
}

#[test]
fn reads_original_images_back() {
    let p = Policy::default();
    let name63 = "n".repeat(63);
    let mut pd = pod(&[
        ("a", "nginx:1.27", None),
        (&name63, "registry:5000/x:2", None),
        ("keep", "localhost:5000/x", None),
    ]);
    pd.spec.as_mut().unwrap().init_containers = Some(vec![Container {
        name: "a".into(),
        image: Some("busybox".into()),
        ..Container::default()
    }]);
    let r = rewrite(&pd, &p, Scope::Create);
    let mut doc = serde_json::to_value(&pd).unwrap();
    json_patch::patch(&mut doc, &r.patch).unwrap();
    let patched: Pod = serde_json::from_value(doc).unwrap();
    let want = vec![
        (
            ContainerKind::Container,
            "a".to_owned(),
            "nginx:1.27".to_owned(),
        ),
        (
            ContainerKind::Container,
            name63.clone(),
            "registry:5000/x:2".to_owned(),
        ),
        (ContainerKind::Init, "a".to_owned(), "busybox".to_owned()),
    ];
    assert_eq!(original_images(&patched), want);
    // Without annotations, the rewritten references still tell.
    let mut bare = patched.clone();
    bare.metadata.annotations = None;
    assert_eq!(
        original_images(&bare),
        vec![
            (
                ContainerKind::Container,
                "a".to_owned(),
                "docker.io/library/nginx:1.27".to_owned()
            ),
            (
                ContainerKind::Container,
                name63,
                "registry:5000/x:2".to_owned()
            ),
            (
                ContainerKind::Init,
                "a".to_owned(),
                "docker.io/library/busybox:latest".to_owned()
            ),
        ]
    );
}

#[test]
fn the_pull_token_secret_is_added_to_rewritten_pods_that_have_pull_secrets() {
    let scoped = Policy {
        pull_secret: Some("kache-pull".into()),
        ..Policy::default()
    };
    let with_secrets = |names: &[&str], image: &str| {
        let mut p = pod(&[("app", image, None)]);
        if !names.is_empty() {
            p.spec.as_mut().unwrap().image_pull_secrets = Some(
                names
                    .iter()
                    .map(|n| k8s_openapi::api::core::v1::LocalObjectReference { name: (*n).into() })
                    .collect(),
            );
        }
        p
    };
    let secrets_after = |p: &Pod, policy: &Policy| -> Vec<String> {
        let r = rewrite(p, policy, Scope::Create);
        let mut doc = serde_json::to_value(p).unwrap();
        json_patch::patch(&mut doc, &r.patch).unwrap();
        let after: Pod = serde_json::from_value(doc).unwrap();
        // Applied, and rewritten again: nothing more to do.
        assert!(rewrite(&after, policy, Scope::Create).patch.0.is_empty());
        after
            .spec
            .unwrap()
            .image_pull_secrets
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.name)
            .collect()
    };
    for (secrets, image, policy, want) in [
        // The pod's own (or its ServiceAccount's, which admission copied in) come first.
        (
            &["creds"][..],
            "ghcr.io/o/a:1",
            &scoped,
            &["creds", "kache-pull"][..],
        ),
        (
            &["a", "b"],
            "ghcr.io/o/a:1",
            &scoped,
            &["a", "b", "kache-pull"],
        ),
        // Already there: once is enough.
        (
            &["kache-pull", "creds"],
            "ghcr.io/o/a:1",
            &scoped,
            &["kache-pull", "creds"],
        ),
        // No pull secrets: a public or cluster image, left as it is.
        (&[], "ghcr.io/o/a:1", &scoped, &[]),
        // Nothing rewritten: nothing added.
        (
            &["creds"],
            "localhost:7439/ghcr.io/o/a:1",
            &scoped,
            &["creds"],
        ),
        // Scoping off.
        (&["creds"], "ghcr.io/o/a:1", &Policy::default(), &["creds"]),
    ] {
        let p = with_secrets(secrets, image);
        assert_eq!(secrets_after(&p, policy), want, "{secrets:?} {image}");
    }
}
