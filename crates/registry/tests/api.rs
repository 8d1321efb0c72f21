//! The Distribution API over real HTTP on 127.0.0.1, one scenario per part of the spec.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kache_oci::{Digest, media_type};
use kache_store::Store;
use kache_testkit::inproc::client;
use kache_testkit::parts::{self, RegistryOptions, Running};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Server {
    base: String,
    addr: std::net::SocketAddr,
    client: Client,
    store: Arc<Store>,
    /// The registry, its store and data directory, alive as long as the scenario.
    part: Running,
}

/// Every scenario runs on both servers: they must answer the same.
macro_rules! on_both_servers {
    ($($name:ident),* $(,)?) => {
        mod kache_server {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::serve(kache_http::ServerKind::Kache).await).await
            })*
        }
        mod hyper_server {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::serve(kache_http::ServerKind::Hyper).await).await
            })*
        }
    };
}

on_both_servers!(
    base_endpoint,
    monolithic_push_get_head_and_ranges,
    sha512_blobs,
    post_then_put_with_the_whole_body,
    chunked_upload_with_ranges_status_and_out_of_order_chunk,
    closing_put_out_of_order_gets_416_and_keeps_the_session,
    cancelled_upload_is_gone,
    cross_repository_mount,
    manifests_by_tag_and_digest_with_blob_checks,
    tag_listing_paginates_with_link,
    referrers_api_and_subject_header,
    deletes_of_tags_manifests_and_blobs,
    bad_input_gets_the_spec_error_and_changes_nothing,
    wrong_digest_on_chunked_upload_keeps_nothing,
    a_manifest_push_names_its_media_type,
);

/// The registry on a free port, answered by `kind`: kache's own server (the default) or hyper
/// (`--http-server hyper`).
async fn serve(kind: kache_http::ServerKind) -> Server {
    let part = parts::registry(RegistryOptions {
        server: kind,
        ..RegistryOptions::default()
    })
    .await;
    Server {
        base: part.base.clone(),
        addr: part.addr,
        client: client(),
        store: part.store().clone(),
        part,
    }
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn req(&self, method: Method, path: &str) -> reqwest::Response {
        self.client
            .request(method, self.url(path))
            .send()
            .await
            .unwrap()
    }

    async fn push_blob(&self, repo: &str, bytes: &[u8]) -> Digest {
        let d = Digest::sha256(bytes);
        let r = self
            .client
            .post(self.url(&format!("/v2/{repo}/blobs/uploads/?digest={d}")))
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        d
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        ct: &str,
        body: &[u8],
    ) -> reqwest::Response {
        self.client
            .put(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header("content-type", ct)
            .body(body.to_vec())
            .send()
            .await
            .unwrap()
    }

    /// Raw HTTP/1.1, so paths reach the server exactly as written (clients normalise `..`).
    async fn raw(&self, method: &str, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        (status, out)
    }

    /// Every file of the store except the index, with its contents' digest, plus the logical
    /// state the index holds: what "the store is unchanged" means.
    fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else if p.file_name().unwrap() != "index.redb" {
                    out.insert(
                        p.strip_prefix(root).unwrap().to_owned(),
                        Digest::sha256(&std::fs::read(&p).unwrap()).to_string(),
                    );
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(self.part.data_dir(), self.part.data_dir(), &mut out);
        out.insert("total_bytes".into(), self.store.total_bytes().to_string());
        out
    }
}

async fn error_code(r: reqwest::Response) -> String {
    let v: Value = r.json().await.expect("error bodies are JSON");
    v["errors"][0]["code"]
        .as_str()
        .expect("errors[0].code")
        .to_owned()
}

fn image_manifest(
    config: &Digest,
    config_len: usize,
    layers: &[(&Digest, usize)],
    extra: Value,
) -> Vec<u8> {
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": config_len},
        "layers": layers.iter().map(|(d, n)| json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d.to_string(), "size": n})).collect::<Vec<_>>(),
    });
    if let (Some(m), Some(e)) = (m.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    serde_json::to_vec(&m).unwrap()
}

async fn base_endpoint(s: Server) {
    let r = s.req(Method::GET, "/v2/").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    assert_eq!(s.req(Method::HEAD, "/v2/").await.status(), StatusCode::OK);
    let r = s.req(Method::POST, "/v2/").await;
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error_code(r).await, "UNSUPPORTED");
}

async fn monolithic_push_get_head_and_ranges(s: Server) {
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let d = s.push_blob("a/b", &bytes).await;
    let path = format!("/v2/a/b/blobs/{d}");

    let r = s.req(Method::GET, &path).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["docker-content-digest"], d.to_string().as_str());
    assert_eq!(r.bytes().await.unwrap(), bytes);

    let r = s.req(Method::HEAD, &path).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-length"], "100000");
    assert_eq!(r.headers()["docker-content-digest"], d.to_string().as_str());

    let ranged = |range: &'static str| s.client.get(s.url(&path)).header("range", range).send();
    let r = ranged("bytes=10-19").await.unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/100000");
    assert_eq!(r.bytes().await.unwrap(), bytes[10..20]);
    let r = ranged("bytes=-5").await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), bytes[99_995..]);
    let r = ranged("bytes=99990-").await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), bytes[99_990..]);
    let r = ranged("bytes=100000-").await.unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.headers()["content-range"], "bytes */100000");

    // The blob belongs to a/b only.
    let r = s.req(Method::GET, &format!("/v2/a/blobs/{d}")).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
}

async fn sha512_blobs(s: Server) {
    let d = Digest::compute(kache_oci::Algorithm::Sha512, b"five hundred and twelve");
    let r = s
        .client
        .post(s.url(&format!("/v2/r/blobs/uploads/?digest={d}")))
        .body("five hundred and twelve")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = s.req(Method::GET, &format!("/v2/r/blobs/{d}")).await;
    assert_eq!(r.headers()["docker-content-digest"], d.to_string().as_str());
    assert_eq!(r.bytes().await.unwrap(), "five hundred and twelve");
    let wrong = Digest::compute(kache_oci::Algorithm::Sha512, b"other");
    let r = s
        .client
        .post(s.url(&format!("/v2/r/blobs/uploads/?digest={wrong}")))
        .body("five hundred and twelve")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
}

async fn post_then_put_with_the_whole_body(s: Server) {
    let r = s.req(Method::POST, "/v2/r/blobs/uploads/").await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(r.headers().contains_key("docker-upload-uuid"));
    let d = Digest::sha256(b"monolithic");
    let r = s
        .client
        .put(s.url(&format!("{loc}?digest={d}")))
        .body("monolithic")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["location"], format!("/v2/r/blobs/{d}").as_str());
    assert_eq!(
        s.req(Method::GET, &format!("/v2/r/blobs/{d}"))
            .await
            .bytes()
            .await
            .unwrap(),
        "monolithic"
    );
}

async fn chunked_upload_with_ranges_status_and_out_of_order_chunk(s: Server) {
    let r = s.req(Method::POST, "/v2/r/blobs/uploads/").await;
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(r.headers()["range"], "0-0");
    let patch = |range: &'static str, body: &'static str| {
        s.client
            .patch(s.url(&loc))
            .header("content-range", range)
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
    };
    let r = patch("0-4", "hello").await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(r.headers()["range"], "0-4");
    assert_eq!(r.headers()["location"], loc.as_str());

    let r = patch("10-14", "world").await.unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.headers()["range"], "0-4");
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_INVALID");

    let r = s.req(Method::GET, &loc).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(r.headers()["range"], "0-4");

    assert_eq!(
        patch("5-10", " world").await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    // A chunk without Content-Range is appended (streamed upload, as docker sends it).
    let r = s.client.patch(s.url(&loc)).body("!").send().await.unwrap();
    assert_eq!(r.headers()["range"], "0-11");

    let d = Digest::sha256(b"hello world!");
    let r = s
        .client
        .put(s.url(&format!("{loc}?digest={d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["docker-content-digest"], d.to_string().as_str());
    assert_eq!(
        s.req(Method::GET, &format!("/v2/r/blobs/{d}"))
            .await
            .bytes()
            .await
            .unwrap(),
        "hello world!"
    );
    let r = s.req(Method::GET, &loc).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
}

/// "If the final chunk is uploaded out of order, the registry MUST respond with a 416": the
/// closing PUT's chunk is held to its Content-Range as a PATCH is, and the client keeps what it
/// had uploaded.
async fn closing_put_out_of_order_gets_416_and_keeps_the_session(s: Server) {
    let r = s.req(Method::POST, "/v2/r/blobs/uploads/").await;
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    let r = s
        .client
        .patch(s.url(&loc))
        .header("content-range", "0-4")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let close = |range: &'static str, body: &'static str| {
        let d = Digest::sha256(format!("hello{body}").as_bytes());
        s.client
            .put(s.url(&format!("{loc}?digest={d}")))
            .header("content-range", range)
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
    };

    let r = close("10-14", "world").await.unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.headers()["range"], "0-4");
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_INVALID");
    let r = s.req(Method::GET, &loc).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT, "the session is kept");
    assert_eq!(r.headers()["range"], "0-4", "with what it had");

    let r = close("5-9", "world").await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let d = Digest::sha256(b"helloworld");
    assert_eq!(r.headers()["docker-content-digest"], d.to_string().as_str());
    assert_eq!(
        s.req(Method::GET, &format!("/v2/r/blobs/{d}"))
            .await
            .bytes()
            .await
            .unwrap(),
        "helloworld"
    );
}

async fn cancelled_upload_is_gone(s: Server) {
    let loc = s.req(Method::POST, "/v2/r/blobs/uploads/").await.headers()["location"]
        .to_str()
        .unwrap()
        .to_owned();
    s.client
        .patch(s.url(&loc))
        .body("partial")
        .send()
        .await
        .unwrap();
    assert_eq!(
        s.req(Method::DELETE, &loc).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        s.req(Method::GET, &loc).await.status(),
        StatusCode::NOT_FOUND
    );
    assert!(
        std::fs::read_dir(s.part.data_dir().join("uploads"))
            .unwrap()
            .next()
            .is_none()
    );
}

async fn cross_repository_mount(s: Server) {
    let d = s.push_blob("src/repo", b"shared layer").await;
    let r = s
        .req(
            Method::POST,
            &format!("/v2/dst/blobs/uploads/?mount={d}&from=src/repo"),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        r.headers()["location"],
        format!("/v2/dst/blobs/{d}").as_str()
    );
    assert_eq!(
        s.req(Method::GET, &format!("/v2/dst/blobs/{d}"))
            .await
            .bytes()
            .await
            .unwrap(),
        "shared layer"
    );
    // Nothing to mount from a repository that lacks it: an ordinary session starts instead.
    let r = s
        .req(
            Method::POST,
            &format!("/v2/other/blobs/uploads/?mount={d}&from=nowhere"),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(
        r.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("/v2/other/blobs/uploads/")
    );
    assert_eq!(
        s.req(Method::GET, &format!("/v2/other/blobs/{d}"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
}

async fn manifests_by_tag_and_digest_with_blob_checks(s: Server) {
    let config = s.push_blob("app", b"{}").await;
    let missing = Digest::sha256(b"never pushed");
    let m = image_manifest(&config, 2, &[(&missing, 12)], json!({}));
    let before = s.snapshot();
    let r = s
        .put_manifest("app", "v1", media_type::OCI_MANIFEST, &m)
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    assert_eq!(s.snapshot(), before, "a rejected manifest leaves nothing");

    let layer = s.push_blob("app", b"never pushed").await;
    assert_eq!(layer, missing);
    let r = s
        .put_manifest("app", "v1", media_type::OCI_MANIFEST, &m)
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let d = Digest::sha256(&m);
    assert_eq!(r.headers()["docker-content-digest"], d.to_string().as_str());
    assert_eq!(
        r.headers()["location"],
        format!("/v2/app/manifests/{d}").as_str()
    );

    for reference in ["v1".to_owned(), d.to_string()] {
        let r = s
            .req(Method::GET, &format!("/v2/app/manifests/{reference}"))
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], media_type::OCI_MANIFEST);
        assert_eq!(r.headers()["docker-content-digest"], d.to_string().as_str());
        assert_eq!(r.bytes().await.unwrap(), m, "byte for byte");
        let r = s
            .req(Method::HEAD, &format!("/v2/app/manifests/{reference}"))
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-length"], m.len().to_string().as_str());
    }

    // Docker schema2 keeps its own media type; an index may name children not yet present.
    let docker = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": media_type::DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config.to_string(), "size": 2},
        "layers": []})).unwrap();
    let r = s
        .put_manifest("app", "docker", media_type::DOCKER_MANIFEST, &docker)
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        s.req(Method::GET, "/v2/app/manifests/docker")
            .await
            .headers()["content-type"],
        media_type::DOCKER_MANIFEST
    );
    let index = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": media_type::OCI_INDEX, "manifests": [
        {"mediaType": media_type::OCI_MANIFEST, "digest": Digest::sha256(b"absent child").to_string(), "size": 1, "platform": {"architecture": "arm64", "os": "linux"}}]})).unwrap();
    assert_eq!(
        s.put_manifest("app", "multi", media_type::OCI_INDEX, &index)
            .await
            .status(),
        StatusCode::CREATED
    );

    // By digest: the digest must be the body's.
    let r = s
        .put_manifest(
            "app",
            &Digest::sha256(b"other").to_string(),
            media_type::OCI_MANIFEST,
            &m,
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = s
        .put_manifest("app", &d.to_string(), media_type::OCI_MANIFEST, &m)
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = s.req(Method::GET, "/v2/app/manifests/v2").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
}

async fn tag_listing_paginates_with_link(s: Server) {
    let config = s.push_blob("p", b"{}").await;
    let m = image_manifest(&config, 2, &[], json!({}));
    for t in ["c", "a", "e", "b", "d"] {
        assert_eq!(
            s.put_manifest("p", t, media_type::OCI_MANIFEST, &m)
                .await
                .status(),
            StatusCode::CREATED
        );
    }
    let r = s.req(Method::GET, "/v2/p/tags/list").await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v, json!({"name": "p", "tags": ["a", "b", "c", "d", "e"]}));

    let mut seen = Vec::new();
    let mut next = Some("/v2/p/tags/list?n=2".to_owned());
    let mut pages = 0;
    while let Some(path) = next.take() {
        pages += 1;
        assert!(pages <= 5, "pagination does not end");
        let r = s.req(Method::GET, &path).await;
        next = r.headers().get("link").map(|l| {
            let l = l.to_str().unwrap();
            assert!(l.ends_with("; rel=\"next\""), "{l}");
            l[l.find('<').unwrap() + 1..l.find('>').unwrap()].to_owned()
        });
        let v: Value = r.json().await.unwrap();
        seen.extend(
            v["tags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_owned()),
        );
    }
    assert_eq!(seen, ["a", "b", "c", "d", "e"]);
    assert_eq!(pages, 3);
    let v: Value = s
        .req(Method::GET, "/v2/p/tags/list?n=2&last=b")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["tags"], json!(["c", "d"]));
    let r = s.req(Method::GET, "/v2/unknown/tags/list").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
}

async fn referrers_api_and_subject_header(s: Server) {
    let config = s.push_blob("r", b"{}").await;
    let subject = image_manifest(&config, 2, &[], json!({}));
    s.put_manifest("r", "v1", media_type::OCI_MANIFEST, &subject)
        .await;
    let sd = Digest::sha256(&subject);
    let empty = s.push_blob("r", b"{}").await;
    let sig = image_manifest(
        &empty,
        2,
        &[],
        json!({
        "artifactType": "application/vnd.example.signature",
        "subject": {"mediaType": media_type::OCI_MANIFEST, "digest": sd.to_string(), "size": subject.len()},
        "annotations": {"org.example.signed-by": "me"}}),
    );
    let sbom = image_manifest(
        &empty,
        2,
        &[],
        json!({
        "artifactType": "application/vnd.example.sbom",
        "subject": {"mediaType": media_type::OCI_MANIFEST, "digest": sd.to_string(), "size": subject.len()}}),
    );
    let r = s
        .put_manifest(
            "r",
            &Digest::sha256(&sig).to_string(),
            media_type::OCI_MANIFEST,
            &sig,
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["oci-subject"], sd.to_string().as_str());
    s.put_manifest(
        "r",
        &Digest::sha256(&sbom).to_string(),
        media_type::OCI_MANIFEST,
        &sbom,
    )
    .await;

    let r = s.req(Method::GET, &format!("/v2/r/referrers/{sd}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], media_type::OCI_INDEX);
    assert!(r.headers().get("oci-filters-applied").is_none());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["mediaType"], media_type::OCI_INDEX);
    let mut types: Vec<&str> = v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["artifactType"].as_str().unwrap())
        .collect();
    types.sort();
    assert_eq!(
        types,
        [
            "application/vnd.example.sbom",
            "application/vnd.example.signature"
        ]
    );

    let r = s
        .req(
            Method::GET,
            &format!("/v2/r/referrers/{sd}?artifactType=application/vnd.example.signature"),
        )
        .await;
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(
        v["manifests"][0]["digest"],
        Digest::sha256(&sig).to_string().as_str()
    );
    assert_eq!(
        v["manifests"][0]["annotations"]["org.example.signed-by"],
        "me"
    );

    // An unknown subject has no referrers, which is an empty index, not an error.
    let v: Value = s
        .req(
            Method::GET,
            &format!("/v2/r/referrers/{}", Digest::sha256(b"x")),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["manifests"], json!([]));

    // Deleting a referrer removes it from the listing.
    s.req(
        Method::DELETE,
        &format!("/v2/r/manifests/{}", Digest::sha256(&sig)),
    )
    .await;
    let v: Value = s
        .req(Method::GET, &format!("/v2/r/referrers/{sd}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
}

async fn deletes_of_tags_manifests_and_blobs(s: Server) {
    let config = s.push_blob("d", b"{}").await;
    let m = image_manifest(&config, 2, &[], json!({}));
    let md = Digest::sha256(&m);
    s.put_manifest("d", "keep", media_type::OCI_MANIFEST, &m)
        .await;
    s.put_manifest("d", "drop", media_type::OCI_MANIFEST, &m)
        .await;

    assert_eq!(
        s.req(Method::DELETE, "/v2/d/manifests/drop").await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        s.req(Method::GET, "/v2/d/manifests/drop").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.req(Method::GET, "/v2/d/manifests/keep").await.status(),
        StatusCode::OK
    );

    assert_eq!(
        s.req(Method::DELETE, &format!("/v2/d/manifests/{md}"))
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        s.req(Method::GET, &format!("/v2/d/manifests/{md}"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.req(Method::GET, "/v2/d/manifests/keep").await.status(),
        StatusCode::NOT_FOUND,
        "tags of a deleted manifest go with it"
    );
    let r = s
        .req(Method::DELETE, &format!("/v2/d/manifests/{md}"))
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");

    assert_eq!(
        s.req(Method::DELETE, &format!("/v2/d/blobs/{config}"))
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        s.req(Method::GET, &format!("/v2/d/blobs/{config}"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    let r = s
        .req(Method::DELETE, &format!("/v2/d/blobs/{config}"))
        .await;
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
}

async fn bad_input_gets_the_spec_error_and_changes_nothing(s: Server) {
    let config = s.push_blob("ok", b"{}").await;
    let good = image_manifest(&config, 2, &[], json!({}));
    s.put_manifest("ok", "v1", media_type::OCI_MANIFEST, &good)
        .await;
    let upload = s.req(Method::POST, "/v2/ok/blobs/uploads/").await.headers()["location"]
        .to_str()
        .unwrap()
        .to_owned();
    s.client
        .patch(s.url(&upload))
        .body("abc")
        .send()
        .await
        .unwrap();
    let before = s.snapshot();

    // Path traversal and invalid names, exactly as sent.
    for (method, path, status, code) in [
        (
            "GET",
            "/v2/../../etc/passwd/manifests/latest",
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/ok/../../etc/blobs/sha256:0",
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/%2e%2e/%2e%2e/manifests/latest",
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/ok%2f..%2f..%2fetc/tags/list",
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2//etc/passwd/manifests/latest",
            400,
            "NAME_INVALID",
        ),
        ("PUT", "/v2/UPPER/manifests/latest", 400, "NAME_INVALID"),
        (
            "GET",
            "/v2/ok/blobs/sha256:../../../../index.redb",
            404,
            "UNSUPPORTED",
        ),
        ("GET", "/v2/ok/blobs/sha256:abc", 400, "DIGEST_INVALID"),
        (
            "GET",
            "/v2/ok/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            "/v2/ok/manifests/sha256:%2e%2e",
            400,
            "DIGEST_INVALID",
        ),
        // A tag that cannot exist: reads find no manifest, a write is invalid.
        ("GET", "/v2/ok/manifests/-bad-tag", 404, "MANIFEST_UNKNOWN"),
        (
            "GET",
            "/v2/ok/manifests/.INVALID_MANIFEST_NAME",
            404,
            "MANIFEST_UNKNOWN",
        ),
        ("HEAD", "/v2/ok/manifests/.INVALID_MANIFEST_NAME", 404, ""),
        (
            "PUT",
            "/v2/ok/manifests/.INVALID_MANIFEST_NAME",
            400,
            "MANIFEST_INVALID",
        ),
        (
            "GET",
            "/v2/ok/blobs/uploads/../../index.redb",
            404,
            "UNSUPPORTED",
        ),
        (
            "GET",
            "/v2/ok/blobs/uploads/..%2f..%2findex.redb",
            404,
            "BLOB_UPLOAD_UNKNOWN",
        ),
        ("GET", "/nothing/here", 404, "UNSUPPORTED"),
        ("BREW", "/v2/ok/manifests/v1", 405, "UNSUPPORTED"),
    ] {
        let (st, body) = s.raw(method, path).await;
        assert_eq!(st, status, "{method} {path}: {body}");
        // A HEAD answer has no body to carry the code.
        assert!(
            method == "HEAD" || body.contains(&format!("\"code\":\"{code}\"")),
            "{method} {path}: {body}"
        );
    }

    // Manifests: oversize, unknown media type, not JSON, not a manifest, wrong digest.
    let big = vec![b' '; 4 * 1024 * 1024 + 1];
    let r = s
        .put_manifest("ok", "big", media_type::OCI_MANIFEST, &big)
        .await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(r).await, "MANIFEST_INVALID");
    let schema1 = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v1+json","config":{"mediaType":"x","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0}}"#;
    for (ct, body) in [
        ("application/vnd.docker.distribution.manifest.v1+json", &schema1[..]),
        ("application/x-unknown", br#"{"schemaVersion":2}"#),
        (media_type::OCI_MANIFEST, b"not json"),
        (media_type::OCI_MANIFEST, br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#),
        (media_type::OCI_MANIFEST, br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:nothex","size":0},"layers":[]}"#),
    ] {
        let r = s.put_manifest("ok", "bad", ct, body).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{ct}");
        assert_eq!(error_code(r).await, "MANIFEST_INVALID", "{ct}");
    }
    let r = s
        .put_manifest(
            "ok",
            &Digest::sha256(b"x").to_string(),
            media_type::OCI_MANIFEST,
            &good,
        )
        .await;
    assert_eq!(error_code(r).await, "DIGEST_INVALID");

    // Blobs: wrong digest on a monolithic push, bad digest parameters, broken Content-Range.
    let r = s
        .client
        .post(s.url(&format!(
            "/v2/ok/blobs/uploads/?digest={}",
            Digest::sha256(b"other")
        )))
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = s
        .client
        .post(s.url("/v2/ok/blobs/uploads/?digest=sha256:zz"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = s.client.put(s.url(&upload)).send().await.unwrap();
    assert_eq!(error_code(r).await, "DIGEST_INVALID", "PUT without digest");
    for range in ["garbage", "5-2", "3-", "-3"] {
        let r = s
            .client
            .patch(s.url(&upload))
            .header("content-range", range)
            .body("xyz")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{range}");
        assert_eq!(error_code(r).await, "BLOB_UPLOAD_INVALID");
    }
    let r = s
        .client
        .patch(s.url(&upload))
        .header("content-range", "3-9")
        .body("xyz")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "Content-Range longer than the body"
    );
    let r = s
        .client
        .patch(s.url(&upload))
        .header("content-range", "0-2")
        .body("xyz")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::RANGE_NOT_SATISFIABLE,
        "rewriting bytes already received"
    );
    let r = s
        .req(Method::GET, &format!("/v2/ok/blobs/uploads/{}", uuid_nil()))
        .await;
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    let r = s
        .req(Method::GET, &upload.replace("/v2/ok/", "/v2/other/"))
        .await;
    assert_eq!(
        error_code(r).await,
        "BLOB_UPLOAD_UNKNOWN",
        "an upload belongs to its repository"
    );

    assert_eq!(s.snapshot(), before, "bad input changed the store");
    assert_eq!(
        s.req(Method::GET, "/v2/ok/manifests/v1")
            .await
            .bytes()
            .await
            .unwrap(),
        good
    );
    let st = s.req(Method::GET, &upload).await;
    assert_eq!(st.headers()["range"], "0-2", "the upload session is intact");
}

fn uuid_nil() -> &'static str {
    "00000000-0000-0000-0000-000000000000"
}

async fn wrong_digest_on_chunked_upload_keeps_nothing(s: Server) {
    let before = s.snapshot();
    let loc = s.req(Method::POST, "/v2/r/blobs/uploads/").await.headers()["location"]
        .to_str()
        .unwrap()
        .to_owned();
    s.client
        .patch(s.url(&loc))
        .body("some bytes")
        .send()
        .await
        .unwrap();
    let r = s
        .client
        .put(s.url(&format!("{loc}?digest={}", Digest::sha256(b"different"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    assert_eq!(s.snapshot(), before);
}

/// A manifest is pushed with its media type in `Content-Type`, as the spec says and
/// distribution requires: without one, or with one that names no manifest, it is refused with
/// MANIFEST_INVALID naming what was sent, and nothing is stored.
async fn a_manifest_push_names_its_media_type(s: Server) {
    let config = s.push_blob("typed", b"{}").await;
    let body = image_manifest(&config, 2, &[], json!({}));
    let put = |ct: Option<&'static str>| {
        let mut r = s
            .client
            .put(s.url("/v2/typed/manifests/v1"))
            .body(body.clone());
        if let Some(ct) = ct {
            r = r.header("content-type", ct);
        }
        r.send()
    };
    for (ct, says) in [
        (None, "Content-Type, one of"),
        (
            Some("text/plain"),
            "\"text/plain\" is not a manifest media type",
        ),
        (Some("application/json"), "\"application/json\""),
        (Some("garbage;;;"), "\"garbage;;;\""),
        (
            Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
            "manifest.v1+prettyjws",
        ),
    ] {
        let r = put(ct).await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{ct:?}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], "MANIFEST_INVALID", "{ct:?}: {v}");
        let message = v["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(says), "{ct:?}: {message}");
        assert_eq!(
            s.req(Method::GET, "/v2/typed/manifests/v1").await.status(),
            StatusCode::NOT_FOUND
        );
    }
    let r = put(Some(
        "application/vnd.oci.image.manifest.v1+json; charset=utf-8",
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = s.req(Method::GET, "/v2/typed/manifests/v1").await;
    assert_eq!(r.headers()["content-type"], media_type::OCI_MANIFEST);
}
