//! `kache certs`: a local CA and a webhook serving certificate, for clusters without
//! cert-manager and for running the webhook by hand.
//!
//! The CA is kept (`ca.key` beside `ca.crt`) and reused when the command runs again, so a renewed
//! serving certificate is trusted by the caBundle the API server already has.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// What `kache certs` makes.
#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    /// Directory to write `ca.crt`, `ca.key`, `tls.crt` and `tls.key` to (made if missing).
    #[arg(long, default_value = "certs")]
    out: PathBuf,
    /// A DNS name of the webhook (`kache-webhook.kache.svc`); repeatable.
    #[arg(long = "dns")]
    dns: Vec<String>,
    /// An IP address of the webhook (`127.0.0.1`); repeatable.
    #[arg(long = "ip")]
    ip: Vec<IpAddr>,
    /// Days the serving certificate is valid.
    #[arg(long, default_value_t = 365)]
    days: u32,
}

/// Writes the CA (unless `out` has one) and a new serving certificate signed by it.
pub fn run(a: &CertsArgs) -> Result<()> {
    if a.dns.is_empty() && a.ip.is_empty() {
        bail!("name the webhook with at least one --dns or --ip: the API server checks them");
    }
    if a.days == 0 {
        bail!("--days must be at least 1");
    }
    fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let (issuer, made) = ca(&a.out)?;

    let mut leaf = CertificateParams::new(a.dns.clone()).context("a --dns name")?;
    leaf.subject_alt_names
        .extend(a.ip.iter().map(|ip| SanType::IpAddress(*ip)));
    leaf.distinguished_name = name(a.dns.first().map_or("kache webhook", String::as_str));
    let now = OffsetDateTime::now_utc();
    leaf.not_before = now - Duration::hours(1);
    leaf.not_after = now + Duration::days(i64::from(a.days));
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().context("generating the serving key")?;
    let cert = leaf
        .signed_by(&key, &issuer)
        .context("signing the serving certificate")?;

    // The key first: a reader that sees the new certificate must find its key.
    write(
        &a.out.join("tls.key"),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write(&a.out.join("tls.crt"), cert.pem().as_bytes(), 0o644)?;
    println!(
        "{} CA in {}; wrote tls.crt and tls.key, valid {} days",
        if made { "made a" } else { "reused the" },
        a.out.display(),
        a.days
    );
    Ok(())
}

/// The CA in `dir`, made (and written) if it has none. Returns whether it was made.
fn ca(dir: &Path) -> Result<(Issuer<'static, KeyPair>, bool)> {
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    match (crt.exists(), key.exists()) {
        (true, true) => {
            let key_pem = fs::read_to_string(&key).with_context(|| format!("{}", key.display()))?;
            let crt_pem = fs::read_to_string(&crt).with_context(|| format!("{}", crt.display()))?;
            let key = KeyPair::from_pem(&key_pem)
                .with_context(|| format!("{} is not a PEM private key", key.display()))?;
            let issuer = Issuer::from_ca_cert_pem(&crt_pem, key)
                .with_context(|| format!("{} is not a PEM CA certificate", crt.display()))?;
            Ok((issuer, false))
        }
        (false, false) => {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.distinguished_name = name("kache webhook CA");
            let now = OffsetDateTime::now_utc();
            params.not_before = now - Duration::hours(1);
            params.not_after = now + Duration::days(3650);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().context("generating the CA key")?;
            let cert = params.self_signed(&key).context("signing the CA")?;
            write(&dir.join("ca.key"), key.serialize_pem().as_bytes(), 0o600)?;
            write(&dir.join("ca.crt"), cert.pem().as_bytes(), 0o644)?;
            Ok((Issuer::new(params, key), true))
        }
        _ => bail!(
            "{} has one of ca.crt and ca.key but not the other: restore it, or remove both for a new CA",
            dir.display()
        ),
    }
}

fn name(common: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common);
    dn
}

/// Writes through a temporary file and a rename, so that a reader (the webhook re-reads its
/// pair every second) never sees half a file.
fn write(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}
