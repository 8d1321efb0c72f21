//! The serving certificate, reloaded from its files when they change (cert-manager renews them
//! in place): new connections get the new pair, open ones keep theirs, nothing restarts.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a certificate/key pair cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: no PEM certificate in it")]
    NoCertificate(PathBuf),
    #[error("{path}: {source}")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{cert} and {key} do not make a usable pair: {source}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// The two files' contents the current pair was built from (or last failed on), to notice change.
#[derive(PartialEq, Eq)]
struct Seen {
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// A certificate resolver over a swappable pair read from `cert` and `key` (PEM).
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    seen: RwLock<Seen>,
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl ReloadingCert {
    /// Loads the pair; fails when it is unreadable or the key does not match the certificate.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        let seen = read(cert, key)?;
        let pair = parse(cert, key, &seen)?;
        Ok(Arc::new(ReloadingCert {
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
            current: RwLock::new(Arc::new(pair)),
            seen: RwLock::new(seen),
        }))
    }

    /// The pair served to new connections.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the files once. When their content changed and makes a valid pair, it becomes the
    /// current one (`Ok(true)`). A half-written or mismatched pair is an error and the current
    /// pair stays; the same content is not retried until it changes again.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let seen = read(&self.cert_path, &self.key_path)?;
        if *self.seen.read().unwrap_or_else(|e| e.into_inner()) == seen {
            return Ok(false);
        }
        let parsed = parse(&self.cert_path, &self.key_path, &seen);
        *self.seen.write().unwrap_or_else(|e| e.into_inner()) = seen;
        let pair = parsed?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(pair);
        Ok(true)
    }

    /// Polls the files every `every`, forever (spawn it; abort it to stop).
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let this = self.clone();
            // File reads block; keep them off the request threads.
            match tokio::task::spawn_blocking(move || this.reload()).await {
                Ok(Ok(true)) => {
                    tracing::info!(cert = %self.cert_path.display(), "serving certificate reloaded")
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "serving certificate not reloaded; keeping the current one")
                }
                Err(e) => tracing::warn!(error = %e, "certificate reload task failed"),
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn read(cert: &Path, key: &Path) -> Result<Seen, TlsError> {
    let r = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.to_owned(),
            source,
        })
    };
    Ok(Seen {
        cert: r(cert)?,
        key: r(key)?,
    })
}

fn parse(cert_path: &Path, key_path: &Path, seen: &Seen) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(&seen.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: cert_path.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert_path.to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(&seen.key).map_err(|source| TlsError::Pem {
        path: key_path.to_owned(),
        source,
    })?;
    let pair =
        CertifiedKey::from_der(chain, key, &provider()).map_err(|source| TlsError::Pair {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
            source,
        })?;
    // from_der lets a key whose public half it cannot compute pass; a pair must match.
    pair.keys_match().map_err(|source| TlsError::Pair {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
        source,
    })?;
    Ok(pair)
}

/// ring, the one provider kache builds with.
fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A TLS 1.2/1.3 server configuration resolving its certificate through `certs`, offering HTTP/2
/// and HTTP/1.1.
pub fn server_config(certs: Arc<ReloadingCert>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
