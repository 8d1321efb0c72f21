//! Warm reads of a private repository with a namespace's pull token, beside the same reads of a
//! public repository, on one registry with scoping on: what checking the token and the grant
//! costs a warm pull.

use std::fmt::Write as _;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, header};
use kache_oci::{Digest, ParsedManifest, RepoName, media_type};
use kache_store::{Storage, Store};
use kache_wire::pull_token::Keys;
use kache_wire::{Grant, Visibility};

use super::{get_load, warm_up};
use crate::client::{self, Url};
use crate::load::{self, LoadResult};
use crate::suite::report::{ratio, thousands};
use crate::suite::servers::{Kind, Server};
use crate::suite::synthetic::{StoreRegistry, start_registry};
use crate::suite::{ACCEPT, Bench};

/// The upstream the two repositories are cached from: a closed port, never asked (reads by
/// digest are served from the store).
const UPSTREAM: &str = "127.0.0.1:1";
/// The namespace granted the private repository.
const NAMESPACE: &str = "bench";
/// How much slower (p99) a private read may be than a public one.
const BUDGET: f64 = 1.1;

/// Warm manifest and 1 MiB blob GETs, public and anonymous beside private with a token.
pub async fn private_step(bench: &mut Bench<'_>) -> Result<()> {
    let Bench {
        o,
        work,
        kache,
        pids,
        meter,
        report,
        ..
    } = bench;
    if !o.wants("private") {
        return Ok(());
    }
    let dir = work.join("kache-private");
    let _ = std::fs::remove_dir_all(&dir);
    let (data, keys) = (dir.join("data"), dir.join("keys"));
    std::fs::create_dir_all(&keys)?;
    std::fs::write(keys.join("k1"), [0x5a; 48])?;
    let token = Keys::from_dir(&keys)?.sign(NAMESPACE)?;
    let (manifest, layer) = fill(&data).await?;

    let StoreRegistry {
        proc: mut registry,
        base,
        ..
    } = start_registry(
        kache,
        &data,
        &dir,
        pids,
        "kache-registry-private",
        &[
            "--pull-token-keys".as_ref(),
            keys.as_os_str(),
            "--insecure-registry".as_ref(),
            UPSTREAM.as_ref(),
        ],
    )
    .await?;
    let server = Server {
        kind: Kind::KacheRegistry,
        label: "kache registry, scoping on",
        procs: vec![("registry", registry.pid)],
        track_memory: false,
    };
    let host = UPSTREAM.replace(':', "_");
    let url = |name: &str, what: &str| format!("{base}/v2/{host}/bench/{name}/{what}");
    let (manifest_path, blob_path) = (format!("manifests/{manifest}"), format!("blobs/{layer}"));

    let mut anonymous = HeaderMap::new();
    anonymous.insert(header::ACCEPT, HeaderValue::from_static(ACCEPT));
    let mut with_token = anonymous.clone();
    with_token.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}"))?,
    );
    // Checked once by hand: the private repository refuses the anonymous reader.
    let refused = Url::parse(&url("private", &manifest_path), None)?;
    let (status, _, _) = client::fetch(&refused, Method::GET, &anonymous, client::empty()).await?;
    if status != http::StatusCode::UNAUTHORIZED {
        bail!("the private repository answered an anonymous read with {status}, not 401");
    }

    let _ = writeln!(
        report.md,
        "### Private repositories: warm reads with a pull token, {} connections, {:?} per cell\n",
        o.connections, o.duration
    );
    let _ = writeln!(
        report.md,
        "One registry with `--pull-token-keys`; the same image in a public repository (read anonymously) and a private one (read with a granted namespace's token, which every request carries and the registry checks: key, HMAC, grant).\n"
    );
    let _ = writeln!(
        report.md,
        "| read | public req/s | p50 ms | p99 ms | private req/s | p50 ms | p99 ms | private/public p99 | private/public req/s |"
    );
    let _ = writeln!(
        report.md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut worst = 0.0f64;
    for (what, path) in [
        ("manifest by digest", &manifest_path),
        ("1 MiB blob", &blob_path),
    ] {
        eprintln!("private: warm {what}, public and private");
        let mut cells: [Vec<LoadResult>; 2] = [Vec::new(), Vec::new()];
        for round in 0..o.rounds {
            // Taking turns within a round, so that drift touches both alike.
            for (i, (name, headers)) in [("public", &anonymous), ("private", &with_token)]
                .into_iter()
                .enumerate()
            {
                let spec = get_load(o, Url::parse(&url(name, path), None)?, headers.clone());
                warm_up(&spec).await?;
                let (r, _) = meter.measure(&server, load::load(spec)).await?;
                eprintln!(
                    "  round {}: {name}: {:.0} req/s, p99 {:.2} ms",
                    round + 1,
                    r.rps(),
                    r.ms(0.99)
                );
                report.note_errors(
                    &format!("private step, {what}, {name}"),
                    r.errors,
                    &r.first_error,
                );
                cells[i].push(r);
            }
        }
        let [public, private] = cells.map(|v| crate::suite::meter::median_by(v, |r| r.rps()));
        worst = worst.max(private.ms(0.99) / public.ms(0.99).max(1e-9));
        let _ = writeln!(
            report.md,
            "| {what} | {} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {} | {} |",
            thousands(public.rps()),
            public.ms(0.5),
            public.ms(0.99),
            thousands(private.rps()),
            private.ms(0.5),
            private.ms(0.99),
            ratio(private.ms(0.99), public.ms(0.99)),
            ratio(private.rps(), public.rps()),
        );
    }
    report.md.push('\n');
    report.budget(
        format!("private reads: a granted token's warm read within {BUDGET}x the public p99"),
        format!("worst p99 ratio {worst:.2}x"),
        worst <= BUDGET,
    );
    registry.stop();
    Ok(())
}

/// The store the step's registry serves: one image (a 1 MiB layer) in a public and a private
/// cached repository of [`UPSTREAM`], the private one granted to [`NAMESPACE`]. Returns the
/// manifest's and the layer's digests.
async fn fill(data: &std::path::Path) -> Result<(Digest, Digest)> {
    let store: Arc<dyn Storage> = Arc::new(Store::open(data)?.0);
    // Bytes no compressor shortens, without a random source: a counter through SHA-256.
    let layer: Vec<u8> = (0..(1u32 << 20) / 32)
        .flat_map(|i| <sha2::Sha256 as sha2::Digest>::digest(i.to_le_bytes()))
        .collect();
    let config = Bytes::from_static(br#"{"architecture":"amd64","os":"linux"}"#);
    let (layer_digest, config_digest) = (Digest::sha256(&layer), Digest::sha256(&config));
    let manifest = Bytes::from(serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest.to_string(), "size": layer.len()}],
    }))?);
    let parsed = ParsedManifest::parse(&manifest, Some(media_type::OCI_MANIFEST))
        .context("the step's manifest")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    for (name, visibility) in [
        ("public", Visibility::Public),
        ("private", Visibility::Private),
    ] {
        let repo: RepoName = format!("{}/bench/{name}", UPSTREAM.replace(':', "_")).parse()?;
        for (d, bytes) in [
            (&config_digest, config.clone()),
            (&layer_digest, Bytes::from(layer.clone())),
        ] {
            let body = futures_util::stream::iter([Ok::<_, kache_store::BodyError>(bytes)]);
            store.put_blob(&repo, d, Box::pin(body)).await?;
        }
        store
            .put_manifest(&repo, &"v1".parse()?, manifest.clone(), &parsed)
            .await?;
        store.set_visibility(&repo, visibility).await?;
        if visibility == Visibility::Private {
            let grant = Grant {
                repository: repo.to_string(),
                namespace: NAMESPACE.to_owned(),
                verified_at: now,
                expires_at: now + 30 * 86_400,
            };
            store.put_grant(&repo, &grant).await?;
        }
    }
    Ok((Digest::sha256(&manifest), layer_digest))
}
