//! wss:// on the client listener (`[server] tls_cert`, `tls_key`).

use std::sync::Arc;

use futures_util::SinkExt;

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wsrelay_testkit::*;

/// The relay's config: [`SIMPLE`] served as `wss://` with `certificate`.
fn tls_config(certificate: &TestCertificate) -> String {
    format!("[server]\n{}{SIMPLE}", certificate.server_lines())
}

/// A TLS client that trusts `certificate` alone.
fn connector(certificate: &TestCertificate) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(certificate.der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn a_wss_client_talks_to_its_backend_through_the_tls_listener() {
    let certificate = TestCertificate::new();
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(&tls_config(&certificate), &[&backend]).await;
    let tcp = TcpStream::connect(relay.addr()).await.unwrap();
    let tls = connector(&certificate)
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
    let certificate = TestCertificate::new();
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(&tls_config(&certificate), &[&backend]).await;
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
        connector(&certificate)
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_key_that_does_not_match_the_certificate_is_refused_at_start() {
    let certificate = TestCertificate::new();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(certificate.key_path(), other.signing_key.serialize_pem()).unwrap();
    let source = tls_config(&certificate).replace("BACKENDS", "[\"ws://127.0.0.1:9\"]");
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
