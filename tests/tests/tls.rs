//! wss:// on the client listener (`[server] tls_cert`, `tls_key`).

use std::sync::Arc;

use futures_util::SinkExt;

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wsrelay_tests::*;

/// A self-signed certificate for `localhost`, written as PEM files in a fresh temp dir.
struct Certificate {
    dir: std::path::PathBuf,
    der: rustls_pki_types::CertificateDer<'static>,
}

impl Certificate {
    fn new(tag: &str) -> Certificate {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let dir = std::env::temp_dir().join(format!("wsrelay-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cert.pem"), generated.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), generated.signing_key.serialize_pem()).unwrap();
        Certificate {
            dir,
            der: generated.cert.der().clone(),
        }
    }

    fn config(&self) -> String {
        format!(
            "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n{SIMPLE}",
            self.dir.join("cert.pem").display(),
            self.dir.join("key.pem").display()
        )
    }

    fn connector(&self) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

impl Drop for Certificate {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_wss_client_talks_to_its_backend_through_the_tls_listener() {
    let certificate = Certificate::new("ok");
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(&certificate.config(), &[&backend]).await;
    let tcp = TcpStream::connect(relay.addr()).await.unwrap();
    let tls = certificate
        .connector()
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let url = format!("wss://localhost:{}/chat", relay.addr().port());
    let (mut client, _) = tokio_tungstenite::client_async(url.into_client_request().unwrap(), tls)
        .await
        .unwrap();
    for n in 0..10 {
        let text = format!("secure {n}");
        client
            .send(tokio_tungstenite::tungstenite::Message::text(text.clone()))
            .await
            .unwrap();
        let reply = futures_util::StreamExt::next(&mut client)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply.to_text().unwrap(), text);
    }
    let seen = &backend.connections()[0];
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn plain_text_on_the_tls_listener_is_refused_and_others_are_served() {
    let certificate = Certificate::new("plain");
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(&certificate.config(), &[&backend]).await;
    let answer = raw_exchange(
        relay.addr(),
        &upgrade_request("/", ""),
        std::time::Duration::from_secs(2),
    )
    .await;
    assert!(
        !answer.starts_with(b"HTTP/1.1 101"),
        "a plain upgrade was accepted"
    );
    // A TLS client still gets in.
    let tcp = TcpStream::connect(relay.addr()).await.unwrap();
    assert!(
        certificate
            .connector()
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_key_that_does_not_match_the_certificate_is_refused_at_start() {
    let certificate = Certificate::new("mismatch");
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(
        certificate.dir.join("key.pem"),
        other.signing_key.serialize_pem(),
    )
    .unwrap();
    let source = certificate
        .config()
        .replace("BACKENDS", "[\"ws://127.0.0.1:9\"]");
    let source = format!(
        "{}\n",
        source.replacen("[server]\n", "[server]\nlisten = \"127.0.0.1:0\"\n", 1)
    );
    let config = wsrelay::config::Config::from_toml(&source, "t.toml").unwrap();
    let error = wsrelay::Relay::bind(config)
        .await
        .err()
        .expect("bind refused")
        .to_string();
    assert!(error.contains("TLS certificate and key"), "{error}");
}
