//! TLS on the client listener (`[server] tls_cert` and `tls_key`, PEM): wss:// with rustls and
//! the `ring` provider, TLS 1.2 and 1.3, ALPN `http/1.1`. The certificate is swapped whole by
//! a reload (`crate::certificates` reads the files): each new handshake takes the one current
//! when it starts, and established connections keep the session they have.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;

/// The listener's current TLS configuration; whether the listener speaks TLS at all is fixed
/// at start.
pub(crate) struct ListenerTls {
    current: ArcSwap<ServerConfig>,
}

impl ListenerTls {
    /// Starts with `config`.
    pub fn new(config: Arc<ServerConfig>) -> ListenerTls {
        ListenerTls {
            current: ArcSwap::new(config),
        }
    }

    /// The acceptor for a new connection: the certificate current now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }

    /// New handshakes get `config` from now on.
    pub fn replace(&self, config: Arc<ServerConfig>) {
        self.current.store(config);
    }
}
