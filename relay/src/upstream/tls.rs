//! TLS to `wss://` backends: an upstream's rustls client configuration (built once per
//! configuration generation by `crate::certificates`), the name each backend is verified
//! against, and what a failed TLS session means in words an operator can act on.

use std::sync::Arc;

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, AlertDescription, CertificateError, ClientConfig};

use crate::config::BackendUrl;

/// How an upstream's `wss://` backends are reached: shared by every dial of the generation
/// (client legs, mux links, health probes, re-originations), so a dial only clones an `Arc`.
pub(crate) struct BackendTls {
    /// Trusted roots, the client certificate if any, ALPN `http/1.1`.
    connector: TlsConnector,
    /// `tls.server_name`: SNI and the name verified, for every backend of the upstream;
    /// `None` uses each backend URL's host.
    server_name: Option<ServerName<'static>>,
}

impl BackendTls {
    /// Settings from a built rustls configuration and the configured `server_name`.
    pub fn new(config: Arc<ClientConfig>, server_name: Option<ServerName<'static>>) -> BackendTls {
        BackendTls {
            connector: TlsConnector::from(config),
            server_name,
        }
    }

    /// The name `backend`'s certificate must hold.
    pub fn server_name(&self, backend: &BackendUrl) -> Result<ServerName<'static>, String> {
        if let Some(name) = &self.server_name {
            return Ok(name.clone());
        }
        let host = backend.host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_owned()).map_err(|_| {
            format!("{host:?} is not a name a certificate can hold; set tls.server_name")
        })
    }

    /// The TLS session over `tcp` with `backend`, verified against [`Self::server_name`].
    pub async fn connect(
        &self,
        tcp: TcpStream,
        backend: &BackendUrl,
    ) -> Result<TlsStream<TcpStream>, String> {
        let name = self.server_name(backend)?;
        let shown = name.to_str().into_owned();
        self.connector
            .connect(name, tcp)
            .await
            .map_err(|error| match rustls_error(&error) {
                Some(error) => explain(error, &shown),
                None => format!("TLS handshake: {error}"),
            })
    }
}

/// The rustls error inside an I/O error from a TLS stream, if that is what it is.
pub(crate) fn rustls_error(error: &std::io::Error) -> Option<&rustls::Error> {
    error.get_ref()?.downcast_ref::<rustls::Error>()
}

/// The rustls error somewhere in `error`'s chain of causes (hyper wraps the I/O error of
/// a TLS stream that failed after its handshake, e.g. on a TLS 1.3 backend's alert).
pub(crate) fn rustls_cause<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(found) = error.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(found) = error
            .downcast_ref::<std::io::Error>()
            .and_then(rustls_error)
        {
            return Some(found);
        }
        next = error.source();
    }
    None
}

/// What a failed TLS session with a backend verified as `name` means, and what to do.
pub(crate) fn explain(error: &rustls::Error, name: &str) -> String {
    use CertificateError as Cert;
    let what = match error {
        rustls::Error::InvalidCertificate(Cert::UnknownIssuer) => format!(
            "its certificate for {name} is not signed by a CA we trust (tls.ca_file, or the system's roots without it)"
        ),
        rustls::Error::InvalidCertificate(
            Cert::NotValidForName | Cert::NotValidForNameContext { .. },
        ) => format!(
            "its certificate does not hold the name {name} (set tls.server_name to a name it holds)"
        ),
        rustls::Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
            format!("its certificate for {name} has expired")
        }
        rustls::Error::InvalidCertificate(Cert::NotValidYet | Cert::NotValidYetContext { .. }) => {
            format!("its certificate for {name} is not valid yet (check the clocks)")
        }
        rustls::Error::InvalidCertificate(other) => {
            format!("its certificate for {name} is refused: {other:?}")
        }
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
            "it requires a client certificate (set tls.client_cert and tls.client_key)".to_owned()
        }
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::AccessDenied),
        ) => format!(
            "it refused our client certificate, or wants one (alert {alert:?}; check tls.client_cert and its CA)"
        ),
        other => other.to_string(),
    };
    format!("TLS with the backend failed: {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_problems_say_what_to_change() {
        let unknown = explain(
            &rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            "chat.internal",
        );
        assert!(unknown.contains("not signed by a CA we trust"), "{unknown}");
        assert!(unknown.contains("tls.ca_file"), "{unknown}");
        let name = explain(
            &rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
            "chat.internal",
        );
        assert!(
            name.contains("does not hold the name chat.internal"),
            "{name}"
        );
        assert!(name.contains("tls.server_name"), "{name}");
        let expired = explain(
            &rustls::Error::InvalidCertificate(CertificateError::Expired),
            "x",
        );
        assert!(expired.contains("expired"), "{expired}");
        let required = explain(
            &rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
            "x",
        );
        assert!(required.contains("tls.client_cert"), "{required}");
    }

    #[test]
    fn a_rustls_error_is_found_under_the_io_errors_wrapping_it() {
        let inner = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        assert!(matches!(
            rustls_error(&io),
            Some(rustls::Error::AlertReceived(_))
        ));
        #[derive(Debug, thiserror::Error)]
        #[error("read the handshake answer")]
        struct Outer(#[source] std::io::Error);
        let outer = Outer(io);
        assert!(rustls_cause(&outer).is_some());
        let plain = std::io::Error::other("connection reset");
        assert!(rustls_cause(&plain).is_none());
    }

    #[test]
    fn the_server_name_is_the_urls_host_unless_configured() {
        let config = Arc::new(
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        );
        let url = BackendUrl::parse("wss://10.0.0.1:9443").unwrap();
        let by_host = BackendTls::new(config.clone(), None);
        assert_eq!(by_host.server_name(&url).unwrap().to_str(), "10.0.0.1");
        let v6 = BackendUrl::parse("wss://[::1]:9443").unwrap();
        assert_eq!(by_host.server_name(&v6).unwrap().to_str(), "::1");
        let named = BackendTls::new(
            config,
            Some(ServerName::try_from("chat.internal").unwrap().to_owned()),
        );
        assert_eq!(named.server_name(&url).unwrap().to_str(), "chat.internal");
    }
}
