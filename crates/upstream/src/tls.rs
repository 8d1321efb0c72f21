//! The TLS client configuration kache's HTTP clients share.

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

use crate::error::UpstreamError;

/// The TLS client configuration of every kache HTTP client: the Mozilla roots compiled in
/// (webpki-roots) plus `extra_ca_pem`, never the system's store, so that kache needs no CA
/// files in its image and trusts the same roots on every node.
pub fn tls_config(extra_ca_pem: &[Vec<u8>]) -> Result<rustls::ClientConfig, UpstreamError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for (i, pem) in extra_ca_pem.iter().enumerate() {
        let mut found = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert =
                cert.map_err(|e| UpstreamError::Config(format!("extra CA #{i} is not PEM: {e}")))?;
            roots.add(cert).map_err(|e| {
                UpstreamError::Config(format!("extra CA #{i} is not a usable certificate: {e}"))
            })?;
            found += 1;
        }
        if found == 0 {
            return Err(UpstreamError::Config(format!(
                "extra CA #{i} holds no PEM CERTIFICATE block"
            )));
        }
    }
    // The binary installs ring as the process default; a library user that did not still gets
    // ring rather than a panic.
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::Config(format!("TLS versions: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use crate::{Upstream, UpstreamConfig, UpstreamError};

    #[test]
    fn bad_ca_is_a_config_error() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        for pem in [
            &b"not pem"[..],
            b"-----BEGIN CERTIFICATE-----\nzz\n-----END CERTIFICATE-----\n",
        ] {
            let err = Upstream::new(UpstreamConfig {
                extra_ca_pem: vec![pem.to_vec()],
                ..Default::default()
            })
            .unwrap_err();
            assert!(matches!(err, UpstreamError::Config(_)), "{err}");
        }
    }
}
