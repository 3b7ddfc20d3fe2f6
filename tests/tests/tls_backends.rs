//! `wss://` backends (`[upstream.NAME] tls`: trusted roots, client certificates, server name)
//! and the listener's certificate rotating at a reload, with real TLS on 127.0.0.1: a test CA
//! made with rcgen, and wss backends that are a rustls acceptor in front of an echo WebSocket
//! or of a mux backend.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use wsrelay::ListenerCertificate;
use wsrelay_testkit::*;
use wsrelay_tests::MuxBackend;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A backend's TLS configuration: `certificate`, and client certificates from `client_ca`
/// required when it is given.
fn server_config(certificate: &IssuedCertificate, client_ca: Option<&TestCa>) -> ServerConfig {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&certificate.cert_path)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&certificate.key_path).unwrap();
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(ca.ca_der()).unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder.with_single_cert(chain, key).unwrap()
}

/// What a wss backend serves once TLS is up.
#[derive(Clone, Copy)]
enum Behind {
    /// An echo WebSocket answering `whoami` with the backend's name.
    Echo,
    /// The plain TCP server at this address (e.g. a mux backend).
    Forward(SocketAddr),
}

/// What a wss backend saw.
#[derive(Default)]
struct WssLog {
    /// TLS handshakes completed.
    handshakes: AtomicUsize,
    /// TLS handshakes that failed (the relay refused our certificate, or we refused its).
    tls_failures: AtomicUsize,
    /// The client certificate of each completed handshake, if one was presented.
    client_certificates: Mutex<Vec<Option<CertificateDer<'static>>>>,
    /// The `User-Agent` of each WebSocket handshake.
    user_agents: Mutex<Vec<String>>,
}

/// A `wss://` backend on 127.0.0.1: a rustls acceptor (its certificate can be changed) in
/// front of an echo WebSocket or another server. Its task, and every connection's, end when
/// it is dropped.
struct WssBackend {
    name: String,
    addr: SocketAddr,
    config: Arc<Mutex<Arc<ServerConfig>>>,
    log: Arc<WssLog>,
    task: JoinHandle<()>,
}

impl WssBackend {
    async fn start(name: &str, config: ServerConfig, behind: Behind) -> WssBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Arc::new(Mutex::new(Arc::new(config)));
        let log = Arc::new(WssLog::default());
        let task = tokio::spawn(serve(
            listener,
            name.to_owned(),
            config.clone(),
            log.clone(),
            behind,
        ));
        WssBackend {
            name: name.to_owned(),
            addr,
            config,
            log,
            task,
        }
    }

    fn url(&self) -> String {
        format!("wss://{}", self.addr)
    }

    /// New TLS handshakes get `config`.
    fn set_config(&self, config: ServerConfig) {
        *self.config.lock().unwrap() = Arc::new(config);
    }

    fn handshakes(&self) -> usize {
        self.log.handshakes.load(Ordering::SeqCst)
    }

    fn tls_failures(&self) -> usize {
        self.log.tls_failures.load(Ordering::SeqCst)
    }
}

impl Drop for WssBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    listener: TcpListener,
    name: String,
    config: Arc<Mutex<Arc<ServerConfig>>>,
    log: Arc<WssLog>,
    behind: Behind,
) {
    // Owned here: aborting the accept task drops the set, which aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        while connections.try_join_next().is_some() {}
        let acceptor = TlsAcceptor::from(config.lock().unwrap().clone());
        connections.spawn(serve_one(acceptor, tcp, name.clone(), log.clone(), behind));
    }
}

async fn serve_one(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    name: String,
    log: Arc<WssLog>,
    behind: Behind,
) {
    let Ok(mut tls) = acceptor.accept(tcp).await else {
        log.tls_failures.fetch_add(1, Ordering::SeqCst);
        return;
    };
    log.handshakes.fetch_add(1, Ordering::SeqCst);
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first().cloned());
    log.client_certificates.lock().unwrap().push(presented);
    match behind {
        Behind::Forward(target) => {
            if let Ok(mut plain) = TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            }
        }
        Behind::Echo => {
            let agents = log.clone();
            #[expect(
                clippy::result_large_err,
                reason = "the callback's error type is tungstenite's HTTP response"
            )]
            let record = move |request: &Request, response: Response| {
                let agent = request
                    .headers()
                    .get("user-agent")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                agents.user_agents.lock().unwrap().push(agent);
                Ok(response)
            };
            let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(tls, record).await else {
                return;
            };
            while let Some(Ok(message)) = socket.next().await {
                let reply = match message {
                    Message::Text(text) if text.as_str() == "whoami" => Message::text(name.clone()),
                    Message::Text(_) | Message::Binary(_) => message,
                    Message::Close(_) => break,
                    _ => continue,
                };
                if socket.send(reply).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// `tls = { ... }` with these `key = "path"` pairs.
fn tls_table(entries: &[(&str, &Path)]) -> String {
    let pairs: Vec<String> = entries
        .iter()
        .map(|(key, path)| format!("{key} = \"{}\"", path.display()))
        .collect();
    format!("tls = {{ {} }}", pairs.join(", "))
}

/// One route `/` hashed by `X-User` over `backends`, with `tls` on the upstream.
fn relay_config(backends: &[String], tls: &str) -> String {
    format!(
        "[server]\nadmin = \"127.0.0.1:0\"\n\n[keepalive]\nping_interval = \"0s\"\n\n[[route]]\npath = \"/\"\nupstream = \"main\"\nhash_key = \"header:X-User\"\n\n[upstream.main]\nbackends = {}\nconnect_timeout = \"2s\"\n{tls}\n",
        backend_list(backends)
    )
}

async fn whoami(relay: &TestRelay, user: &str) -> Result<String, StatusCode> {
    match connect_request(request_as(&relay.url("/"), user)).await {
        Ok(mut client) => Ok(round_trip(&mut client, "whoami").await),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status()),
        Err(other) => panic!("{other}"),
    }
}

/// `GET /api/backends` of the relay's admin listener, as (url -> row).
async fn backend_rows(relay: &TestRelay) -> Vec<serde_json::Value> {
    let response = raw_exchange(
        relay.handle.admin_addr().unwrap(),
        b"GET /api/backends HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        WAIT,
    )
    .await;
    let text = String::from_utf8_lossy(&response);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str::<serde_json::Value>(body)
        .expect("JSON rows")
        .as_array()
        .unwrap()
        .clone()
}

/// Waits until `check` holds (polling; the wait ends with a failure after [`WAIT`]).
async fn eventually<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    retry(what, || {
        let holds = check();
        async move { if holds.await { Ok(()) } else { Err("not yet") } }
    })
    .await
}

async fn healthy(relay: &TestRelay, url: &str) -> bool {
    let rows = backend_rows(relay).await;
    let row = rows
        .iter()
        .find(|row| row["url"] == url)
        .unwrap_or_else(|| panic!("{url} in {rows:?}"));
    row["healthy"] == true
}

#[tokio::test]
async fn a_client_is_relayed_through_a_wss_backend_trusted_by_its_ca() {
    let ca = TestCa::new("backends");
    let certificate = ca.issue("alpha", &["127.0.0.1"]);
    let alpha = WssBackend::start("alpha", server_config(&certificate, None), Behind::Echo).await;
    let config = relay_config(&[alpha.url()], &tls_table(&[("ca_file", &ca.ca_path())]));
    let relay = TestRelay::start(&config, &[]).await;
    let mut client = connect_as(&relay.url("/chat?room=1"), "u").await;
    assert_eq!(round_trip(&mut client, "whoami").await, "alpha");
    for n in 0..20 {
        let text = format!("over tls {n}");
        assert_eq!(round_trip(&mut client, &text).await, text);
    }
    client
        .send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut client).await,
        Message::binary(vec![0u8, 1, 2, 255])
    );
    assert_eq!(alpha.handshakes(), 1);
    assert_eq!(alpha.tls_failures(), 0);
    // No client certificate was configured, so none was presented.
    assert_eq!(*alpha.log.client_certificates.lock().unwrap(), [None]);
}

#[tokio::test]
async fn server_name_sets_the_name_verified_in_the_backends_certificate() {
    let ca = TestCa::new("backends");
    // The certificate names a service, not the address the URL dials.
    let certificate = ca.issue("named", &["chat.internal"]);
    let named = WssBackend::start("named", server_config(&certificate, None), Behind::Echo).await;
    let ca_file = ca.ca_path();
    let by_host = relay_config(&[named.url()], &tls_table(&[("ca_file", &ca_file)]));
    let relay = TestRelay::start(&by_host, &[]).await;
    assert_eq!(whoami(&relay, "u").await, Err(StatusCode::BAD_GATEWAY));
    let by_name = relay_config(
        &[named.url()],
        &format!(
            "tls = {{ ca_file = \"{}\", server_name = \"chat.internal\" }}",
            ca_file.display()
        ),
    );
    let relay = TestRelay::start(&by_name, &[]).await;
    assert_eq!(whoami(&relay, "u").await, Ok("named".to_owned()));
}

#[tokio::test]
async fn a_backend_that_requires_a_client_certificate_takes_ours_and_refuses_a_relay_without_one() {
    let backends_ca = TestCa::new("backends");
    let clients_ca = TestCa::new("clients");
    let certificate = backends_ca.issue("strict", &["127.0.0.1"]);
    let relay_identity = clients_ca.issue("relay", &["relay.internal"]);
    let strict = WssBackend::start(
        "strict",
        server_config(&certificate, Some(&clients_ca)),
        Behind::Echo,
    )
    .await;
    let ca_file = backends_ca.ca_path();
    let with_identity = relay_config(
        &[strict.url()],
        &tls_table(&[
            ("ca_file", &ca_file),
            ("client_cert", &relay_identity.cert_path),
            ("client_key", &relay_identity.key_path),
        ]),
    );
    let relay = TestRelay::start(&with_identity, &[]).await;
    assert_eq!(whoami(&relay, "u").await, Ok("strict".to_owned()));
    assert_eq!(
        *strict.log.client_certificates.lock().unwrap(),
        [Some(relay_identity.der.clone())]
    );

    let without = relay_config(&[strict.url()], &tls_table(&[("ca_file", &ca_file)]));
    let bare = TestRelay::start(&without, &[]).await;
    assert_eq!(whoami(&bare, "u").await, Err(StatusCode::BAD_GATEWAY));
    // The backend refused that session, and it counts against the backend's health.
    assert!(strict.tls_failures() >= 1);
    assert!(!healthy(&bare, &strict.url()).await);
}

#[tokio::test]
async fn an_untrusted_or_misnamed_backend_fails_its_dial_and_the_next_backend_takes_the_client() {
    let ca = TestCa::new("backends");
    let stranger = TestCa::new("stranger");
    let good = WssBackend::start(
        "good",
        server_config(&ca.issue("good", &["127.0.0.1"]), None),
        Behind::Echo,
    )
    .await;
    let untrusted = WssBackend::start(
        "untrusted",
        server_config(&stranger.issue("untrusted", &["127.0.0.1"]), None),
        Behind::Echo,
    )
    .await;
    let misnamed = WssBackend::start(
        "misnamed",
        server_config(&ca.issue("misnamed", &["elsewhere.internal"]), None),
        Behind::Echo,
    )
    .await;
    let urls = [untrusted.url(), misnamed.url(), good.url()];
    let ca_file = ca.ca_path();
    let source = relay_config(&urls, &tls_table(&[("ca_file", &ca_file)]))
        + &format!(
            "\n[[route]]\npath = \"/untrusted\"\nupstream = \"untrusted\"\n\n[upstream.untrusted]\nbackends = [\"{}\"]\n{}\n",
            untrusted.url(),
            tls_table(&[("ca_file", &ca_file)])
        );
    let relay = TestRelay::start(&source, &[]).await;
    for (first, backend) in [(0, &untrusted), (1, &misnamed)] {
        let user = user_ranked_first(&urls, first);
        assert_eq!(
            whoami(&relay, &user).await,
            Ok("good".to_owned()),
            "a client ranked first on {}",
            backend.name
        );
        // The relay reached it and refused its certificate: no session came of it.
        assert!(backend.tls_failures() >= 1, "{}", backend.name);
        assert_eq!(backend.handshakes(), 0, "{}", backend.name);
        assert!(!healthy(&relay, &backend.url()).await, "{}", backend.name);
    }
    assert!(healthy(&relay, &good.url()).await);
    // With nothing else to try, the client gets 502.
    let only_untrusted = relay.url("/untrusted");
    assert_eq!(
        refused_status(&only_untrusted).await,
        StatusCode::BAD_GATEWAY
    );
}

#[tokio::test]
async fn a_client_whose_wss_backend_dies_is_moved_to_the_next_one_over_tls() {
    let ca = TestCa::new("backends");
    let start = |name: &'static str| {
        let config = server_config(&ca.issue(name, &["127.0.0.1"]), None);
        WssBackend::start(name, config, Behind::Echo)
    };
    let first = start("first").await;
    let second = start("second").await;
    let urls = [first.url(), second.url()];
    let relay = TestRelay::start(
        &relay_config(&urls, &tls_table(&[("ca_file", &ca.ca_path())])),
        &[],
    )
    .await;
    let mut client = connect_as(&relay.url("/"), &user_ranked_first(&urls, 0)).await;
    assert_eq!(round_trip(&mut client, "whoami").await, "first");
    // Its process goes away: every connection drops without a close frame.
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    while round_trip(&mut client, "whoami").await != "second" {
        assert!(tokio::time::Instant::now() < deadline, "never moved");
    }
    // Its one TLS session with the replacement carries the client from now on.
    assert_eq!(second.handshakes(), 1);
}

#[tokio::test]
async fn mux_links_run_over_wss() {
    let ca = TestCa::new("backends");
    let mux = MuxBackend::start("m").await;
    let plain: SocketAddr = mux.url().trim_start_matches("ws://").parse().unwrap();
    let front = WssBackend::start(
        "front",
        server_config(&ca.issue("front", &["127.0.0.1"]), None),
        Behind::Forward(plain),
    )
    .await;
    let source = relay_config(&[front.url()], &tls_table(&[("ca_file", &ca.ca_path())]))
        .replace(
            "hash_key = \"header:X-User\"",
            "hash_key = \"header:X-User\"\nmode = \"mux\"",
        )
        .replace(
            "connect_timeout = \"2s\"",
            "connect_timeout = \"2s\"\nmux_links = 2",
        );
    let relay = TestRelay::start(&source, &[]).await;
    wait_until("two mux links over TLS", || mux.links_open() == 2).await;
    assert_eq!(front.handshakes(), 2);
    let mut clients = Vec::new();
    for n in 0..10 {
        let mut client = connect_as(&relay.url("/room"), &format!("user-{n}")).await;
        assert_eq!(round_trip(&mut client, "whoami").await, "m");
        assert_eq!(
            round_trip(&mut client, &format!("hello {n}")).await,
            format!("hello {n}")
        );
        clients.push(client);
    }
    assert_eq!(mux.streams().len(), 10);
    // Ten clients, still the same two TLS sessions.
    assert_eq!(front.handshakes(), 2);
}

#[tokio::test]
async fn health_probes_over_tls_mark_a_backend_unhealthy_and_healthy_again() {
    let ca = TestCa::new("backends");
    let stranger = TestCa::new("stranger");
    let good_config = || server_config(&ca.issue("probed", &["127.0.0.1"]), None);
    let probed = WssBackend::start("probed", good_config(), Behind::Echo).await;
    let source = relay_config(&[probed.url()], &tls_table(&[("ca_file", &ca.ca_path())]))
        + "health_check = { interval = \"100ms\", timeout = \"1s\", unhealthy_after = 2, healthy_after = 2 }\n";
    let relay = TestRelay::start(&source, &[]).await;
    assert_eq!(whoami(&relay, "u").await, Ok("probed".to_owned()));
    eventually("probes over TLS", || async {
        probed
            .log
            .user_agents
            .lock()
            .unwrap()
            .iter()
            .any(|agent| agent == "wsrelay-health-check")
    })
    .await;

    // Its certificate is now one the relay does not trust: probes fail, it leaves the ranking.
    probed.set_config(server_config(
        &stranger.issue("probed", &["127.0.0.1"]),
        None,
    ));
    let url = probed.url();
    eventually("marked unhealthy", || async {
        !healthy(&relay, &url).await
    })
    .await;
    assert_eq!(
        whoami(&relay, "u").await,
        Err(StatusCode::SERVICE_UNAVAILABLE)
    );

    // A trusted certificate again: probes succeed, and clients are served.
    probed.set_config(good_config());
    eventually("marked healthy", || async { healthy(&relay, &url).await }).await;
    assert_eq!(whoami(&relay, "u").await, Ok("probed".to_owned()));
}

/// A `wss://` connection to the relay trusting `ca`; gives the WebSocket and the certificate
/// the relay presented.
async fn wss_client(
    relay: &TestRelay,
    ca: &TestCa,
) -> (
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>,
    CertificateDer<'static>,
) {
    let mut roots = RootCertStore::empty();
    roots.add(ca.ca_der()).unwrap();
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(relay.addr()).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let url = format!("wss://localhost:{}/", relay.addr().port());
    let (socket, _) = tokio_tungstenite::client_async(url.into_client_request().unwrap(), tls)
        .await
        .unwrap();
    (socket, presented)
}

async fn echo(
    socket: &mut tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>,
    text: &str,
) -> String {
    socket.send(Message::text(text)).await.unwrap();
    loop {
        match within("an echo", socket.next()).await {
            Some(Ok(Message::Text(reply))) => return reply.as_str().to_owned(),
            Some(Ok(_)) => continue,
            other => panic!("expected an echo, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_reload_rotates_the_listener_certificate_for_new_handshakes_only() {
    let ca = TestCa::new("listener");
    let backend = TestBackend::start("b").await;
    let dir = TempDir::new();
    let write_config = |cert: &Path, key: &Path| {
        dir.write(
            "wsrelay.toml",
            &format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\n[[route]]\npath = \"/\"\nupstream = \"main\"\n\n[upstream.main]\nbackends = [\"{}\"]\n",
                cert.display(),
                key.display(),
                backend.url()
            ),
        )
    };
    let first = ca.issue("first", &["localhost"]);
    let path = write_config(&first.cert_path, &first.key_path);
    let source = std::fs::read_to_string(&path).unwrap();
    let relay = TestRelay::start_with(&source, &[], |builder| builder.config_path(&path)).await;
    let (mut old, presented) = wss_client(&relay, &ca).await;
    assert_eq!(presented, first.der);
    assert_eq!(echo(&mut old, "before").await, "before");

    // New paths.
    let second = ca.issue("second", &["localhost"]);
    write_config(&second.cert_path, &second.key_path);
    let report = relay.handle.reload_from_file().await.unwrap();
    assert!(report.restart_needed.is_empty(), "{report}");
    assert_eq!(
        report.listener_certificate,
        ListenerCertificate::Changed,
        "{report}"
    );
    assert!(
        report
            .to_string()
            .contains("listener certificate: re-read, changed"),
        "{report}"
    );
    let (mut new, presented) = wss_client(&relay, &ca).await;
    assert_eq!(presented, second.der);
    // The same files again: read, found the same, and said so.
    let report = relay.handle.reload_from_file().await.unwrap();
    assert_eq!(
        report.listener_certificate,
        ListenerCertificate::Unchanged,
        "{report}"
    );
    assert_eq!(wss_client(&relay, &ca).await.1, second.der);
    assert_eq!(echo(&mut new, "new").await, "new");
    // The connection made before the reload keeps its session.
    assert_eq!(echo(&mut old, "still here").await, "still here");

    // New contents at the same paths (a renewal in place), through POST /api/reload.
    let renewed = ca.issue("second", &["localhost"]);
    let answer = raw_exchange(
        relay.handle.admin_addr().unwrap(),
        b"POST /api/reload HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        WAIT,
    )
    .await;
    let text = String::from_utf8_lossy(&answer);
    assert_eq!(status_of(&answer), 200, "{text}");
    let body: serde_json::Value =
        serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(
        body["listener_certificate"], "changed",
        "the answer says the certificate changed: {text}"
    );
    let (_, presented) = wss_client(&relay, &ca).await;
    assert_eq!(presented, renewed.der);

    // A key that does not match its certificate is refused with the reason; the renewed
    // certificate stays in force.
    write_config(&renewed.cert_path, &first.key_path);
    let answer = raw_exchange(
        relay.handle.admin_addr().unwrap(),
        b"POST /api/reload HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        WAIT,
    )
    .await;
    let text = String::from_utf8_lossy(&answer);
    assert_eq!(status_of(&answer), 400, "{text}");
    assert!(text.contains("server.tls_key"), "{text}");
    assert!(text.contains("TLS certificate and key"), "{text}");
    // A file that isn't there: the same.
    let missing = dir.path().join("missing.pem");
    write_config(&missing, &renewed.key_path);
    let error = relay
        .handle
        .reload_from_file()
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("line 4: server.tls_cert"), "{error}");
    assert!(error.contains("missing.pem"), "{error}");
    let (mut after, presented) = wss_client(&relay, &ca).await;
    assert_eq!(presented, renewed.der);
    assert_eq!(echo(&mut after, "after").await, "after");
    assert_eq!(echo(&mut old, "oldest").await, "oldest");
}

/// Runs `wsrelay check` on `source` (written in `dir`); gives (exit code, stdout).
fn check(dir: &TempDir, source: &str) -> (Option<i32>, String) {
    let path = dir.write("wsrelay.toml", source);
    let output = Command::new(wsrelay_binary())
        .args(["check", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("run wsrelay check");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn check_reports_each_tls_problem_with_its_key_and_line() {
    let dir = TempDir::new();
    let ca = TestCa::new("check");
    let head = "[[route]]\npath = \"/\"\nupstream = \"secure\"\n\n";
    // Keys that don't fit together: all reported in one run.
    let (code, stdout) = check(
        &dir,
        &format!(
            "{head}[upstream.secure]\nbackends = [\"wss://10.0.0.1:9443\"]\ntls = {{ client_cert = \"relay.pem\" }}\n\n[upstream.plain]\nbackends = [\"ws://10.0.0.2:9001\"]\ntls = {{ ca_file = \"ca.pem\" }}\n"
        ),
    );
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "line 7: upstream.secure.tls.client_cert: needs upstream.secure.tls.client_key too"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("line 11: upstream.plain.tls: applies to wss:// backends only"),
        "{stdout}"
    );
    // Files that can't be used, relative to the config file.
    dir.write("junk.pem", "not PEM at all\n");
    let (code, stdout) = check(
        &dir,
        &format!(
            "{head}[upstream.secure]\nbackends = [\"wss://10.0.0.1:9443\"]\ntls = {{ ca_file = \"missing-ca.pem\" }}\n"
        ),
    );
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("line 7: upstream.secure.tls.ca_file: "),
        "{stdout}"
    );
    assert!(stdout.contains("missing-ca.pem"), "{stdout}");
    let (code, stdout) = check(
        &dir,
        &format!(
            "{head}[upstream.secure]\nbackends = [\"wss://10.0.0.1:9443\"]\ntls = {{ ca_file = \"{}\", client_cert = \"junk.pem\", client_key = \"junk.pem\" }}\n",
            ca.ca_path().display()
        ),
    );
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("line 7: upstream.secure.tls.client_cert: ")
            && stdout.contains("junk.pem: no CERTIFICATE"),
        "{stdout}"
    );
    // And a sound one passes.
    let identity = ca.issue("relay", &["relay.internal"]);
    let (code, stdout) = check(
        &dir,
        &format!(
            "{head}[upstream.secure]\nbackends = [\"wss://10.0.0.1:9443\"]\n{}\n",
            tls_table(&[
                ("ca_file", &ca.ca_path()),
                ("client_cert", &identity.cert_path),
                ("client_key", &identity.key_path),
            ])
        ),
    );
    assert_eq!(code, Some(0), "{stdout}");
}
