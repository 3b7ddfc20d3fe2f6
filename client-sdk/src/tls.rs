//! TLS for `wss://` URLs: rustls with the `ring` provider, TLS 1.2 and 1.3, trusting the
//! system's roots, certificates you give, or a `rustls::ClientConfig` of your own.
//!
//! The connector is built once per client (reading the system store is not free) and reused
//! for every reconnect. A dial is TCP connect -> [`TlsConnector`] -> WebSocket handshake over
//! the TLS stream (see [`dial`](crate::dial)).

use std::path::PathBuf;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// Which servers a `wss://` client trusts. Set with the builders' `tls_*` methods; the
/// default is [`Tls::SystemRoots`].
#[derive(Clone, Default)]
pub enum Tls {
    /// The operating system's trust store (read with `rustls-native-certs`: on Linux the
    /// usual CA bundle files, or `SSL_CERT_FILE` / `SSL_CERT_DIR`).
    #[default]
    SystemRoots,
    /// Exactly these certificates (DER), e.g. your own CA or a server's self-signed
    /// certificate; the system store is not consulted.
    Roots(Vec<CertificateDer<'static>>),
    /// Exactly the certificates in this PEM file.
    CaFile(PathBuf),
    /// A complete rustls configuration, used as is (ALPN, client certificates, ...).
    Config(Arc<ClientConfig>),
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tls::SystemRoots => f.write_str("SystemRoots"),
            Tls::Roots(roots) => write!(f, "Roots({} certificates)", roots.len()),
            Tls::CaFile(path) => f.debug_tuple("CaFile").field(path).finish(),
            Tls::Config(_) => f.write_str("Config(..)"),
        }
    }
}

/// Why TLS could not be set up or completed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The system trust store held no usable certificate.
    #[error("no usable certificate in the system trust store{}{details}", if details.is_empty() { "" } else { ": " })]
    NoSystemRoots {
        /// What went wrong while reading it, if anything was reported.
        details: String,
    },
    /// A CA file could not be read or holds no certificate.
    #[error("CA file {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused a trust root or the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The URL's host is not something a certificate can name.
    #[error("{host:?} is not a valid TLS server name")]
    ServerName {
        /// The host from the URL.
        host: String,
    },
    /// The TLS handshake failed: an untrusted or expired certificate, a name mismatch, no
    /// common protocol version, or the connection dropped.
    #[error("TLS handshake with {host}: {source}")]
    Handshake {
        /// The host from the URL.
        host: String,
        /// What rustls or the socket reported.
        source: std::io::Error,
    },
}

/// Builds the connector for `tls`.
pub(crate) fn connector(tls: &Tls) -> Result<TlsConnector, TlsError> {
    let roots = match tls {
        Tls::Config(config) => return Ok(TlsConnector::from(Arc::clone(config))),
        Tls::SystemRoots => system_roots()?,
        Tls::Roots(certificates) => {
            let mut roots = RootCertStore::empty();
            for certificate in certificates {
                roots.add(certificate.clone())?;
            }
            roots
        }
        Tls::CaFile(path) => {
            let error = |reason: String| TlsError::CaFile {
                path: path.clone(),
                reason,
            };
            let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| error(e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| error(e.to_string()))?;
            if certificates.is_empty() {
                return Err(error("no CERTIFICATE in the file".into()));
            }
            let mut roots = RootCertStore::empty();
            for certificate in certificates {
                roots.add(certificate)?;
            }
            roots
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // A WebSocket upgrade is HTTP/1.1; say so, so a server that also speaks h2 does not pick it.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let details = found
            .errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        return Err(TlsError::NoSystemRoots { details });
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_certificates_is_refused_with_its_path() {
        let path =
            std::env::temp_dir().join(format!("wsrelay-empty-ca-{}.pem", std::process::id()));
        std::fs::write(&path, "not a certificate\n").unwrap();
        let error = connector(&Tls::CaFile(path.clone())).err().unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(matches!(error, TlsError::CaFile { .. }), "{error}");
        assert!(error.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn a_missing_ca_file_is_refused_with_its_path() {
        let error = connector(&Tls::CaFile("/nonexistent/ca.pem".into()))
            .err()
            .unwrap();
        assert!(
            error
                .to_string()
                .starts_with("CA file /nonexistent/ca.pem: "),
            "{error}"
        );
    }
}
