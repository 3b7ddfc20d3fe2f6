//! Graceful drain in-process, and rendezvous hashing seen from outside: every hash
//! key type sends a client to the backend the published ranking names.

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsrelay::hashing::Ranking;
use wsrelay_testkit::*;

#[tokio::test]
async fn drain_closes_clients_1001_and_backends_then_stops_accepting() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(
        &format!("[server]\nshutdown_grace = \"4s\"\n{SIMPLE}"),
        &[&backend],
    )
    .await;
    let addr = relay.addr();
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut client = connect(&relay.url("/")).await;
        assert_eq!(round_trip(&mut client, "hi").await, "hi");
        clients.push(client);
    }
    let report = tokio::spawn(relay.handle.shutdown());
    for client in &mut clients {
        let frame = expect_close(client).await.expect("a close frame");
        assert_eq!(frame.code, CloseCode::Away);
    }
    let report = report.await.unwrap();
    assert_eq!(report.sessions_at_drain, 5);
    assert_eq!(report.sessions_aborted, 0);
    wait_until("every backend leg closed", || backend.open() == 0).await;
    let closes = backend.closes();
    assert_eq!(closes.len(), 5);
    assert!(
        closes
            .iter()
            .all(|c| c.as_ref().map(|f| f.code) == Some(CloseCode::Away))
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting"
    );
}

#[tokio::test]
async fn drain_gives_up_on_clients_that_never_finish_the_close_after_the_grace() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(
        &format!("[server]\nshutdown_grace = \"1s\"\n{SIMPLE}"),
        &[&backend],
    )
    .await;
    // A raw client that never reads: it can't complete a close handshake.
    let _stuck = RawClient::connect(relay.addr(), "/").await;
    wait_until("the session to open", || relay.handle.open_sessions() == 1).await;
    let report = tokio::time::timeout(WAIT, relay.handle.shutdown())
        .await
        .expect("shutdown hung");
    assert_eq!(report.sessions_at_drain, 1);
    // Its close handshake would wait 3 s for the client's answer: the 1 s grace ends it first.
    assert_eq!(report.sessions_aborted, 1);
}

async fn whoami_with(relay: &TestRelay, path: &str, header: Option<(&str, &str)>) -> String {
    let mut request = relay.url(path).into_client_request().unwrap();
    if let Some((name, value)) = header {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let mut client = connect_request(request).await.unwrap();
    let name = round_trip(&mut client, "whoami").await;
    client.send(Message::Close(None)).await.unwrap();
    name
}

#[tokio::test]
async fn every_hash_key_type_lands_where_the_ranking_says() {
    let backends = [
        TestBackend::start("b0").await,
        TestBackend::start("b1").await,
        TestBackend::start("b2").await,
    ];
    let urls: Vec<String> = backends.iter().map(TestBackend::url).collect();
    let ranking = Ranking::new(urls.iter().map(|u| (u.as_str(), 1.0)));
    let expected = |key: &str| format!("b{}", ranking.rank(key.as_bytes())[0]);
    let refs: Vec<&TestBackend> = backends.iter().collect();

    let relay = TestRelay::start(&simple_hashed("header:X-User"), &refs).await;
    for user in ["ann", "bob", "cat", "dan", "eve", "fay"] {
        let got = whoami_with(&relay, "/", Some(("x-user", user))).await;
        assert_eq!(got, expected(user), "header {user}");
        // Stable: the same key lands on the same backend again.
        assert_eq!(whoami_with(&relay, "/", Some(("x-user", user))).await, got);
    }

    let relay = TestRelay::start(&simple_hashed("cookie:sid"), &refs).await;
    for sid in ["s1", "s2", "s3", "s4", "s5"] {
        let cookie = format!("theme=dark; sid={sid}");
        assert_eq!(
            whoami_with(&relay, "/", Some(("cookie", &cookie))).await,
            expected(sid)
        );
    }

    let relay = TestRelay::start(&simple_hashed("query:room"), &refs).await;
    for room in ["r1", "r2", "r3", "r4", "r5"] {
        let path = format!("/chat?x=1&room={room}");
        assert_eq!(whoami_with(&relay, &path, None).await, expected(room));
    }

    let relay = TestRelay::start(&simple_hashed("path"), &refs).await;
    for path in ["/a", "/b", "/c", "/d", "/e"] {
        assert_eq!(whoami_with(&relay, path, None).await, expected(path));
    }

    // remote_addr hashes the IP without the port, and a missing key falls back to it.
    let relay = TestRelay::start(&simple_hashed("remote_addr"), &refs).await;
    assert_eq!(whoami_with(&relay, "/", None).await, expected("127.0.0.1"));
    let relay = TestRelay::start(&simple_hashed("header:X-User"), &refs).await;
    assert_eq!(whoami_with(&relay, "/", None).await, expected("127.0.0.1"));
}

#[tokio::test]
async fn two_relays_with_the_same_backends_agree_without_coordination() {
    let backends = [
        TestBackend::start("b0").await,
        TestBackend::start("b1").await,
        TestBackend::start("b2").await,
        TestBackend::start("b3").await,
    ];
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let config = simple_hashed("header:X-User");
    let first = TestRelay::start(&config, &refs).await;
    let second = TestRelay::start(&config, &refs).await;
    for n in 0..20 {
        let user = format!("user-{n}");
        assert_eq!(
            whoami_with(&first, "/", Some(("x-user", &user))).await,
            whoami_with(&second, "/", Some(("x-user", &user))).await
        );
    }
}

#[tokio::test]
async fn relays_with_reuse_port_share_one_address_and_the_kernel_spreads_clients() {
    let backend = TestBackend::start("b").await;
    let config = format!("[server]\nreuse_port = true\n{SIMPLE}");
    let first = TestRelay::start(&config, &[&backend]).await;
    let shared = format!(
        "[server]\nlisten = \"{}\"\nreuse_port = true\n{SIMPLE}",
        first.addr()
    );
    let second = TestRelay::start(&shared, &[&backend]).await;
    assert_eq!(second.addr(), first.addr());

    // Without the setting the address is taken.
    let alone = format!("[server]\nlisten = \"{}\"\n{SIMPLE}", first.addr())
        .replace("BACKENDS", &backend_list(&[backend.url()]));
    let alone: wsrelay::config::Config = toml::from_str(&alone).unwrap();
    assert!(matches!(
        wsrelay::Relay::bind(alone).await,
        Err(wsrelay::RelayError::Bind { .. })
    ));

    // Clients from new source ports hash to either listener; both take some.
    let mut clients = Vec::new();
    while first.handle.open_sessions() == 0 || second.handle.open_sessions() == 0 {
        assert!(clients.len() < 200, "200 clients all went to one relay");
        let mut client = connect(&first.url("/")).await;
        assert_eq!(round_trip(&mut client, "hi").await, "hi");
        clients.push(client);
    }
}
