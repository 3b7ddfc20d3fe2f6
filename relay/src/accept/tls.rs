//! TLS on the client listener (`[server] tls_cert` and `tls_key`, PEM): wss:// with rustls and
//! the `ring` provider, TLS 1.2 and 1.3, ALPN `http/1.1`, and `h2` first when `[server] http2` is
//! on (browsers then carry their WebSockets over HTTP/2 by themselves, RFC 8441). The
//! certificate is swapped whole by a reload (`crate::certificates` reads the files): each new
//! handshake takes the one current when it starts, and established connections keep the
//! session they have.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls_pki_types::CertificateDer;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;

use crate::certificates::ListenerChain;

/// The ALPN protocol id of HTTP/2.
pub(crate) const ALPN_H2: &[u8] = b"h2";
/// The ALPN protocol id of HTTP/1.1.
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The listener's current TLS configuration; whether the listener speaks TLS at all, and
/// whether it offers HTTP/2, are fixed at start.
pub(crate) struct ListenerTls {
    current: ArcSwap<ServerConfig>,
    /// The chain `current` presents. Locked across a replacement, so that two reloads at once
    /// each compare with what the other left.
    chain: Mutex<Vec<CertificateDer<'static>>>,
    http2: bool,
}

impl ListenerTls {
    /// Starts with `certificate`, offering HTTP/2 by ALPN when `http2` is set.
    pub fn new(certificate: ListenerChain, http2: bool) -> ListenerTls {
        ListenerTls {
            current: ArcSwap::new(with_alpn(certificate.config, http2)),
            chain: Mutex::new(certificate.chain),
            http2,
        }
    }

    /// The acceptor for a new connection: the certificate current now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }

    /// New handshakes get `certificate` from now on, if its chain is not the one presented
    /// already; returns whether it was new. The same chain keeps the configuration in force,
    /// and with it the TLS sessions clients may resume.
    pub fn replace(&self, certificate: ListenerChain) -> bool {
        let mut chain = self.chain.lock().expect("listener chain lock");
        if *chain == certificate.chain {
            return false;
        }
        self.current
            .store(with_alpn(certificate.config, self.http2));
        *chain = certificate.chain;
        true
    }
}

/// `config` offering the protocols the listener speaks.
fn with_alpn(config: Arc<ServerConfig>, http2: bool) -> Arc<ServerConfig> {
    let mut config = Arc::unwrap_or_clone(config);
    config.alpn_protocols = alpn_protocols(http2);
    Arc::new(config)
}

/// The ALPN protocols offered, in the server's order of preference.
fn alpn_protocols(http2: bool) -> Vec<Vec<u8>> {
    if http2 {
        vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()]
    } else {
        vec![ALPN_HTTP1.to_vec()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2_is_offered_first_only_when_on() {
        assert_eq!(alpn_protocols(false), [b"http/1.1".to_vec()]);
        assert_eq!(alpn_protocols(true), [b"h2".to_vec(), b"http/1.1".to_vec()]);
    }
}
