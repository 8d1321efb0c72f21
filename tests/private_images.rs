//! Private images for real: CNCF distribution with htpasswd (Debian's `docker-registry`) is the
//! upstream that asks for credentials, `kache registry` runs with private-image scoping, and
//! skopeo pulls with a namespace's pull token (as the kubelet would with the `kache-pull`
//! Secret) or without one. What the upstream says decides: a repository it serves anonymously
//! is public, one that took a namespace's credentials is private and read only by namespaces
//! whose own credentials the upstream accepted; grants survive the upstream going away and a
//! kill -9, and pull-token keys rotate.

use kache_testkit as support;

use std::sync::mpsc;
use std::time::Duration;

use kache_wire::pull_token::Keys;
use serde_json::{Value, json};
use support::http::{request, try_request_within};
use support::pull::{
    Scratch, assert_pulled, assert_spec_error, cache_repo, manifest_headers, multi_layer_image,
    path_str,
};
use support::{Distribution, DistributionKind, KacheProxy, KacheRegistry, get};

const USER: &str = "puller";
const PASSWORD: &str = "private-pw-7d41";

fn post(base: &str, path: &str, body: Value) -> support::http::Response {
    request(
        "POST",
        &format!("{base}{path}"),
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

fn grant(internal: &str, image: &str, ns: &str, password: Option<&str>) -> support::http::Response {
    let mut body = json!({"image": image, "namespace": ns});
    if let Some(p) = password {
        body["credentials"] = json!({"username": USER, "password": p});
    }
    post(internal, "/kache/v1/grants", body)
}

fn key(c: u8) -> Vec<u8> {
    vec![c; 32]
}

#[test]
fn a_private_image_is_served_only_to_namespaces_the_upstream_accepts() {
    let s = Scratch::new("kache-e2e-private");
    let mut upstream = Distribution::start(DistributionKind::htpasswd(USER, PASSWORD));
    let open = Distribution::start(DistributionKind::Open);
    let (host, open_host) = (upstream.host(), open.host());
    let image = multi_layer_image(41);
    let public = multi_layer_image(51);
    let src = s.layout("src", &[("v1", &image), ("public", &public)]);
    s.skopeo.copy(
        &format!("{src}:v1"),
        &format!("docker://{host}/test/app:v1"),
        &["--dest-creds", &format!("{USER}:{PASSWORD}")],
    );
    s.skopeo.copy(
        &format!("{src}:public"),
        &format!("docker://{open_host}/test/public:v1"),
        &[],
    );

    let key_dir = s.path("keys");
    std::fs::create_dir_all(&key_dir).unwrap();
    std::fs::write(key_dir.join("k1"), key(1)).unwrap();
    let k1 = Keys::from_entries([("k1", key(1))]).unwrap();
    let mut registry = KacheRegistry::start_with_internal(
        s.path("data"),
        &[
            "--insecure-registry",
            &format!("{host},{open_host}"),
            "--pull-token-keys",
            path_str(&key_dir).as_str(),
        ],
    );
    let (base, internal) = (registry.base_url(), registry.internal_url());
    let app = cache_repo(&host, "test/app");
    let app_image = format!("{host}/test/app:v1");
    let pull = |registry: &KacheRegistry, token: Option<&str>| -> Result<(), String> {
        let src = format!("docker://{}/{app}:v1", registry.addr());
        match token {
            Some(t) => {
                let creds = format!("kache:{t}");
                let got = s.pull(&src, &["--src-creds", &creds]);
                assert_pulled("pulled with a granted token", &image, &got);
                Ok(())
            }
            None => Err(s.pull_fails(&src, &[])),
        }
    };

    // The controller warms the image with team-a's pull secret: the upstream refuses anyone
    // without it, so the repository is private.
    let r = post(
        &internal,
        "/kache/v1/warm",
        json!({"image": app_image, "credentials": {"username": USER, "password": PASSWORD}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    for (what, headers) in [
        ("anonymous", vec![]),
        (
            "a token of no namespace granted",
            vec![(
                "Authorization".to_owned(),
                format!("Bearer {}", k1.sign("team-a").unwrap()),
            )],
        ),
    ] {
        let mut h: Vec<(&str, &str)> = manifest_headers().to_vec();
        h.extend(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let r = get(&format!("{base}/v2/{app}/manifests/v1"), &h);
        assert_spec_error(what, &r, &[401], "UNAUTHORIZED");
        let challenge = r.header("www-authenticate").unwrap_or_default().to_owned();
        assert!(
            challenge.starts_with(&format!(
                "Bearer realm=\"http://{}/kache/token\"",
                registry.addr()
            )),
            "{what}: {challenge}"
        );
        let r = get(
            &format!("{base}/v2/{app}/blobs/{}", image.layers[0].digest),
            &h,
        );
        assert_spec_error(what, &r, &[401], "UNAUTHORIZED");
    }
    let stderr = pull(&registry, None).unwrap_err();
    assert!(
        stderr.to_lowercase().contains("unauthorized") || stderr.contains("401"),
        "{stderr}"
    );

    // team-a's own credentials, checked upstream: granted.
    let r = grant(&internal, &app_image, "team-a", Some(PASSWORD));
    assert_eq!(r.status, 200, "{}", r.text());
    let g = r.json();
    assert_eq!(g["visibility"], "private", "{g}");
    assert_eq!(g["granted"], true, "{g}");
    assert!(g["expiresAt"].as_u64().is_some(), "{g}");
    let team_a = k1.sign("team-a").unwrap();
    pull(&registry, Some(&team_a)).unwrap();

    // team-b: a wrong password, or none, grants nothing; its token reads nothing.
    for password in [Some("wrong"), None] {
        let r = grant(&internal, &app_image, "team-b", password);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["granted"], false, "{password:?}: {}", r.text());
    }
    let team_b = k1.sign("team-b").unwrap();
    let r = get(
        &format!("{base}/v2/{app}/manifests/v1"),
        &[("Authorization", &format!("Bearer {team_b}"))],
    );
    assert_eq!(r.status, 401, "{}", r.text());
    // Bad requests get a clear error and grant nothing.
    for body in [
        json!({"image": app_image, "namespace": "Not_A_Namespace"}),
        json!({"image": "", "namespace": "team-c"}),
        json!({"image": app_image}),
    ] {
        let r = post(&internal, "/kache/v1/grants", body.clone());
        assert!(
            matches!(r.status, 400 | 404),
            "{body}: {} {}",
            r.status,
            r.text()
        );
    }
    let r = post(
        &base,
        "/kache/v1/grants",
        json!({"image": app_image, "namespace": "team-c"}),
    );
    assert!(
        matches!(r.status, 401 | 405),
        "grants are written on the internal listener only: {} {}",
        r.status,
        r.text()
    );

    // A public image of another upstream is read by anyone, and the private layer is not
    // read through it.
    let open_repo = cache_repo(&open_host, "test/public");
    let got = s.pull(&format!("docker://{}/{open_repo}:v1", registry.addr()), &[]);
    assert_pulled("a public image, anonymously", &public, &got);
    let r = get(
        &format!("{base}/v2/{open_repo}/blobs/{}", image.layers[0].digest),
        &[("Authorization", "Bearer anonymous")],
    );
    assert_eq!(r.status, 404, "{}", r.text());

    // The upstream gone: team-a still reads from the cache, team-b is still refused, and a new
    // namespace is refused a grant (fails closed).
    upstream.stop();
    pull(&registry, Some(&team_a)).unwrap();
    let r = get(
        &format!("{base}/v2/{app}/manifests/v1"),
        &[("Authorization", &format!("Bearer {team_b}"))],
    );
    assert_eq!(r.status, 401);
    let r = grant(&internal, &app_image, "team-c", Some(PASSWORD));
    assert_eq!(r.status, 502, "{}", r.text());
    upstream.start_again();

    // A new key, signing from now on: its tokens read at once (the registry reads the keys
    // again when a token names one it lacks), the old ones still read.
    std::fs::write(key_dir.join("k2"), key(2)).unwrap();
    let k2 = Keys::from_entries([("k1", key(1)), ("k2", key(2))]).unwrap();
    let team_a2 = k2.sign("team-a").unwrap();
    assert!(team_a2.starts_with("v1.k2."));
    pull(&registry, Some(&team_a2)).unwrap();
    pull(&registry, Some(&team_a)).unwrap();

    // Through the node proxy, as the kubelet pulls: the ping challenges, the proxy's token
    // endpoint hands the token back, the registry checks it.
    let proxy = KacheProxy::start(
        &registry.base_url(),
        &[
            "--insecure-registry",
            &format!("{host},{open_host}"),
            "--private-images",
        ],
    );
    // containerd trades its credentials with a POSTed password grant, which the proxy's own
    // server must read.
    let r = request(
        "POST",
        &format!("{}/kache/token", proxy.base_url()),
        &[("Content-Type", "application/x-www-form-urlencoded")],
        format!("grant_type=password&username=kache&password={team_a}&client_id=containerd-client")
            .as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["access_token"], team_a.as_str(), "{}", r.text());
    let via_proxy = format!("docker://{}/{app}:v1", proxy.addr());
    let got = s.pull(&via_proxy, &["--src-creds", &format!("kache:{team_a}")]);
    assert_pulled("through the proxy with team-a's token", &image, &got);
    let stderr = s.pull_fails(&via_proxy, &[]);
    assert!(
        stderr.contains("401") || stderr.to_lowercase().contains("unauthorized"),
        "{stderr}"
    );
    let r = get(&format!("{}/v2/{app}/manifests/v1", proxy.base_url()), &[]);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(
        r.header("www-authenticate"),
        Some(
            format!(
                "Bearer realm=\"http://{}/kache/token\",service=\"kache\",scope=\"repository:{app}:pull\"",
                proxy.addr()
            )
            .as_str()
        ),
        "the proxy points the client at its own token endpoint"
    );
    let got = s.pull(&format!("docker://{}/{open_repo}:v1", proxy.addr()), &[]);
    assert_pulled(
        "a public image through the proxy, anonymously",
        &public,
        &got,
    );

    // kill -9 while grants are written: every grant acknowledged is there after the restart.
    let (tx, rx) = mpsc::channel();
    let writer = {
        let (internal, image) = (internal.clone(), app_image.clone());
        std::thread::spawn(move || {
            for i in 0..200 {
                let ns = format!("ns-{i}");
                let body = json!({"image": image, "namespace": ns,
                    "credentials": {"username": USER, "password": PASSWORD}});
                // The registry dies under it: a request that gets no answer ends the loop.
                let Ok(r) = try_request_within(
                    Duration::from_secs(10),
                    "POST",
                    &format!("{internal}/kache/v1/grants"),
                    &[("Content-Type", "application/json")],
                    body.to_string().as_bytes(),
                ) else {
                    break;
                };
                if r.status != 200 {
                    break;
                }
                assert_eq!(r.json()["granted"], true, "{}", r.text());
                if tx.send(ns).is_err() {
                    break;
                }
            }
        })
    };
    let mut acknowledged = Vec::new();
    while acknowledged.len() < 10 {
        acknowledged.push(rx.recv().expect("the writer stopped before 10 grants"));
    }
    registry.kill9();
    writer.join().unwrap();
    acknowledged.extend(rx.try_iter());
    // The old key dropped while the registry was down.
    std::fs::remove_file(key_dir.join("k1")).unwrap();
    registry.restart();
    let listed = get(&format!("{}/kache/v1/grants", registry.internal_url()), &[]).json();
    let held: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["namespace"].as_str().unwrap())
        .collect();
    for ns in &acknowledged {
        assert!(held.contains(&ns.as_str()), "grant of {ns} lost: {listed}");
    }
    assert!(held.contains(&"team-a"), "{listed}");
    pull(&registry, Some(&team_a2)).unwrap();
    let r = get(
        &format!("{}/v2/{app}/manifests/v1", registry.base_url()),
        &[("Authorization", &format!("Bearer {team_a}"))],
    );
    assert_eq!(r.status, 401, "a token under the dropped key: {}", r.text());

    // The registry down: the proxy serves the public image from its upstream as it always
    // did, and the private one fails closed, with kache's challenge, not the upstream's.
    registry.stop();
    let got = s.pull(&format!("docker://{}/{open_repo}:v1", proxy.addr()), &[]);
    assert_pulled("a public image with the registry down", &public, &got);
    for auth in [None, Some(format!("Bearer {team_a2}"))] {
        let h: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let r = get(&format!("{}/v2/{app}/manifests/v1", proxy.base_url()), &h);
        assert_eq!(r.status, 401, "{auth:?}: {}", r.text());
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with(&format!(
                "Bearer realm=\"http://{}/kache/token\"",
                proxy.addr()
            )),
            "{challenge}"
        );
    }
}

#[test]
fn images_fetched_with_the_chart_wide_credentials_are_the_cluster_s_unless_made_private() {
    let s = Scratch::new("kache-e2e-cluster");
    let upstream = Distribution::start(DistributionKind::htpasswd(USER, PASSWORD));
    let host = upstream.host();
    let image = multi_layer_image(61);
    let src = s.layout("src", &[("v1", &image)]);
    s.skopeo.copy(
        &format!("{src}:v1"),
        &format!("docker://{host}/test/app:v1"),
        &["--dest-creds", &format!("{USER}:{PASSWORD}")],
    );
    let config = s.path("config.json");
    support::pull::write_docker_config(&config, &host, USER, PASSWORD);
    let key_dir = s.path("keys");
    std::fs::create_dir_all(&key_dir).unwrap();
    std::fs::write(key_dir.join("k1"), key(1)).unwrap();
    let app = cache_repo(&host, "test/app");
    let image_ref = format!("{host}/test/app:v1");

    for (name, extra, visibility) in [
        ("cluster", None, "cluster"),
        ("private", Some(host.as_str()), "private"),
    ] {
        let mut args = vec![
            "--insecure-registry".to_owned(),
            host.clone(),
            "--pull-token-keys".to_owned(),
            path_str(&key_dir),
            "--docker-config".to_owned(),
            path_str(&config),
        ];
        if let Some(r) = extra {
            args.extend(["--private-registry".to_owned(), r.to_owned()]);
        }
        let registry = KacheRegistry::start_with_internal(s.path(name), &args);
        // A node's pull with no token: fetched with the chart-wide credentials.
        let r = get(
            &format!("{}/v2/{app}/manifests/v1", registry.base_url()),
            &manifest_headers(),
        );
        let again = get(
            &format!("{}/v2/{app}/manifests/v1", registry.base_url()),
            &manifest_headers(),
        );
        let g = grant(&registry.internal_url(), &image_ref, "team-a", None).json();
        assert_eq!(g["visibility"], visibility, "{name}: {g}");
        match visibility {
            "cluster" => {
                assert_eq!(r.status, 200, "{name}: {}", r.text());
                assert_eq!(again.status, 200, "{name}: every pod reads it");
                assert_eq!(g["granted"], true, "{name}: {g}");
                let got = s.pull(&format!("docker://{}/{app}:v1", registry.addr()), &[]);
                assert_pulled("a cluster image, anonymously", &image, &got);
            }
            _ => {
                // The fetch that showed it private answers its own caller no better.
                assert_eq!(r.status, 401, "{name}: {}", r.text());
                assert_eq!(again.status, 401, "{name}: {}", again.text());
                assert_eq!(g["granted"], false, "{name}: {g}");
            }
        }
    }
}
