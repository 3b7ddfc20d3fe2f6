//! The `wsrelay` command as users run it (docs/operations.md, "Running"): `check`, refusing
//! unimplemented keys, quick start, signals, log formats, `tap` and `demo`, and what each says
//! when something is wrong. Every test drives the real binary.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsrelay_testkit::{
    Client, RawClient, RelayProcess, TempDir, TestBackend, TestCa, WAIT, backend_list, connect,
    expect_close, retry, round_trip, unused_addr, wait_until, wsrelay_binary,
};

fn binary() -> &'static Path {
    wsrelay_binary()
}

/// Runs `wsrelay ARGS` to completion (for commands that exit by themselves).
fn run_to_end(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("run wsrelay")
}

/// Keeps reading a client in the background: tungstenite sends its answer to the relay's
/// Close only while the socket is polled, and an unanswered Close makes the relay wait out its
/// close-handshake timeout, which would slow every drain down.
fn keep_reading(mut client: Client) {
    tokio::spawn(async move { while let Some(Ok(_)) = client.next().await {} });
}

/// Builds a config file; `extra_server` goes under `[server]`, `route_extra` into the route.
fn config(extra_server: &str, route_extra: &str, backends: &[String]) -> String {
    let list = backend_list(backends);
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{extra_server}\n\n[[route]]\npath = \"/\"\nupstream = \"chat\"\n{route_extra}\n\n[upstream.chat]\nbackends = {list}\n"
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `wsrelay check` on `source` and returns (exit code, stdout, stderr).
fn check(source: &str) -> (Option<i32>, String, String) {
    let dir = TempDir::new();
    let path = dir.write("wsrelay.toml", source);
    let output = run_to_end(&["check", "--config", path.to_str().unwrap()]);
    (
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr),
    )
}

const GOOD: &str = r#"# a valid config; check must accept it
[server]
listen = "127.0.0.1:0"
max_connections = 10

# handshake_timeout is on line 7 of this file
handshake_timeout = "10s"

[[route]]
path = "/"
upstream = "chat"
preserve_host = true

[upstream.chat]
backends = ["ws://127.0.0.1:9001"]
"#;

#[test]
fn check_accepts_a_good_config_and_prints_ok() {
    let (code, stdout, stderr) = check(GOOD);
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("ok"), "{stdout}");
}

#[test]
fn check_names_each_problem_with_its_key_and_line() {
    let cases = [
        (
            ("\"10s\"", "\"ten\""),
            ["line 7: handshake_timeout", "\"ten\""],
        ),
        (
            ("preserve_host", "preserve_hots"),
            ["line 12", "preserve_hots"],
        ),
        (
            ("upstream = \"chat\"", "upstream = \"chta\""),
            ["line 11: route[0].upstream", "chta"],
        ),
    ];
    for ((from, to), expected) in cases {
        let (code, stdout, stderr) = check(&GOOD.replace(from, to));
        assert_eq!(code, Some(1), "{to}: stdout: {stdout}\nstderr: {stderr}");
        for text in expected {
            assert!(stdout.contains(text), "{to}: {text:?} missing in: {stdout}");
        }
    }
}

#[test]
fn check_validates_discover_and_resolver() {
    let discovered = |discover: &str, server: &str| {
        GOOD.replace(
            "backends = [\"ws://127.0.0.1:9001\"]",
            &format!("discover = {{ {discover} }}"),
        )
        .replace(
            "max_connections = 10",
            &format!("max_connections = 10\n{server}"),
        )
    };
    let good = discovered(
        "dns = \"chat.default.svc.cluster.local:9000\", refresh = \"5s\", scheme = \"ws\", path = \"\"",
        "resolver = \"127.0.0.1:53\"",
    );
    let (code, stdout, stderr) = check(&good);
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    let cases = [
        (
            discovered("dns = \"chat\"", ""),
            "line 16: discover: invalid discover.dns \"chat\": no port",
        ),
        (
            discovered("dns = \"chat:9000\", refresh = \"0s\"", ""),
            "line 16: upstream.chat.discover: refresh must be above 0s",
        ),
        (
            discovered("dns = \"chat:9000\", scheme = \"tcp\"", ""),
            "line 16: discover: unknown variant `tcp`, expected `ws` or `wss`",
        ),
        (
            discovered("dns = \"chat:9000\"", "resolver = \"8.8.8.8\""),
            "line 5: resolver: invalid resolver \"8.8.8.8\"",
        ),
        (
            GOOD.replace(
                "backends = [\"ws://127.0.0.1:9001\"]",
                "backends = [\"ws://127.0.0.1:9001\"]\ndiscover = { dns = \"chat:9000\" }",
            ),
            "line 16: upstream.chat.discover: an upstream has either backends or discover, not both",
        ),
        (
            GOOD.replace("backends = [\"ws://127.0.0.1:9001\"]", ""),
            "line 14: upstream.chat: needs backends",
        ),
    ];
    for (source, expected) in cases {
        let (code, stdout, stderr) = check(&source);
        assert_eq!(
            code,
            Some(1),
            "{expected}: stdout: {stdout}\nstderr: {stderr}"
        );
        assert!(
            stdout.contains(expected),
            "{expected:?} missing in: {stdout}"
        );
    }
}

#[tokio::test]
async fn running_with_an_unreadable_tls_file_refuses_to_start_and_names_the_key() {
    let dir = TempDir::new();
    let source =
        config("", "", &["wss://127.0.0.1:9".into()]) + "tls = { ca_file = \"missing-ca.pem\" }\n";
    let path = dir.write("unreadable.toml", &source);
    let mut relay = RelayProcess::spawn(&["--config", path.to_str().unwrap()], "info");
    let status = relay.wait_exit().await;
    assert!(!status.success(), "wsrelay started anyway");
    let stderr = relay.stderr().join("\n");
    assert!(stderr.contains("upstream.chat.tls.ca_file"), "{stderr}");
    assert!(stderr.contains("missing-ca.pem"), "{stderr}");
}

/// Starts a relay, relays through it, sends `signal`, and checks the drain: the
/// client and its backend both get 1001 and the process exits 0.
async fn drains_on(signal: &str, use_config: bool) {
    let alpha = TestBackend::start("alpha").await;
    let bravo = TestBackend::start("bravo").await;
    let addr = unused_addr();
    let listen = addr.to_string();
    let dir = TempDir::new();
    let mut args = vec!["--listen".to_owned(), listen];
    if use_config {
        let source = config("shutdown_grace = \"2s\"", "", &[alpha.url(), bravo.url()]);
        let path = dir.write("grace.toml", &source);
        args.extend(["--config".into(), path.to_str().unwrap().to_owned()]);
    } else {
        for backend in [&alpha, &bravo] {
            args.extend(["--backend".into(), backend.url()]);
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut relay = RelayProcess::spawn(&args, "info");
    relay.wait_listening(addr).await;

    let mut client = connect(&format!("ws://{addr}/room")).await;
    assert_eq!(round_trip(&mut client, "hello").await, "hello");
    let name = round_trip(&mut client, "whoami").await;
    let backend = if name == alpha.name { &alpha } else { &bravo };

    relay.signal(signal);
    let frame = expect_close(&mut client).await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Away);
    keep_reading(client);
    wait_until("the backend to get Close 1001", || {
        backend.close_codes().contains(&Some(1001))
    })
    .await;
    let status = relay.wait_exit().await;
    assert!(status.success(), "{status:?}: {:?}", relay.stderr());
}

#[tokio::test]
async fn quick_start_relays_and_sigterm_closes_both_legs_1001_and_exits_0() {
    drains_on("TERM", false).await;
}

#[tokio::test]
async fn sigint_closes_both_legs_1001_and_exits_0_from_a_config_with_a_grace() {
    drains_on("INT", true).await;
}

#[tokio::test]
async fn a_client_that_never_answers_the_close_still_gets_1001_and_the_relay_exits_0() {
    let backend = TestBackend::start("alpha").await;
    let addr = unused_addr();
    let dir = TempDir::new();
    let path = dir.write(
        "grace.toml",
        &config("shutdown_grace = \"2s\"", "", &[backend.url()]),
    );
    let mut relay = RelayProcess::spawn(
        &[
            "--config",
            path.to_str().unwrap(),
            "--listen",
            &addr.to_string(),
        ],
        "info",
    );
    relay.wait_listening(addr).await;
    // A raw client never answers the relay's Close, so only the grace period ends its session.
    let mut stuck = RawClient::connect(addr, "/").await;
    wait_until("the backend leg", || backend.open() == 1).await;

    relay.signal("TERM");
    let status = relay.wait_exit().await;
    assert!(status.success(), "{status:?}: {:?}", relay.stderr());
    assert_eq!(stuck.close_code().await, Some(1001));
}

/// Parses every stderr line as a JSON object.
fn json_lines(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let value: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(value.is_object(), "not a JSON object: {line}");
            value
        })
        .collect()
}

/// Runs a quick-start relay with JSON logs, passes one session through it and stops it;
/// returns its stderr lines.
async fn one_session_with_json_logs(rust_log: &str) -> Vec<String> {
    one_session("json", rust_log).await.lines
}

/// What [`one_session`] saw.
struct OneSession {
    /// The relay's client listener.
    addr: SocketAddr,
    /// The relay's stderr.
    lines: Vec<String>,
    /// The `X-Relay-Conn-Id` the backend got.
    conn_id: String,
}

/// Runs a quick-start relay with `log_format`, passes one session through it and stops it.
async fn one_session(log_format: &str, rust_log: &str) -> OneSession {
    let backend = TestBackend::start("alpha").await;
    let addr = unused_addr();
    let mut relay = RelayProcess::spawn(
        &[
            "--log-format",
            log_format,
            "--listen",
            &addr.to_string(),
            "--backend",
            &backend.url(),
        ],
        rust_log,
    );
    relay.wait_listening(addr).await;
    let mut client = connect(&format!("ws://{addr}/")).await;
    assert_eq!(round_trip(&mut client, "hello").await, "hello");
    client.close(None).await.unwrap();
    expect_close(&mut client).await;
    // The session's closing line is written after the client's close completes.
    wait_until("the backend leg to end", || {
        backend.open() == 0 && !backend.closes().is_empty()
    })
    .await;
    if rust_log == "info" {
        relay
            .wait_stderr("the session closed line", |l| l.contains("session closed"))
            .await;
    }
    relay.signal("TERM");
    let status = relay.wait_exit().await;
    assert!(status.success(), "{status:?}: {:?}", relay.stderr());
    let conn_id = backend.connections()[0]
        .header("x-relay-conn-id")
        .expect("the backend got X-Relay-Conn-Id");
    OneSession {
        addr,
        lines: relay.stderr(),
        conn_id,
    }
}

/// The one access line a session writes, at its close, says who, where to, how it ended and
/// what crossed, in the span of the id the backend got; the session's opening writes nothing
/// at the default level.
#[tokio::test]
async fn json_logs_are_json_objects_and_the_access_line_carries_the_connection_id() {
    let session = one_session("json", "info").await;
    let lines = json_lines(&session.lines);
    assert!(
        lines.iter().all(|l| l["message"] != "session open"),
        "{lines:?}"
    );
    let closed: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "session closed")
        .collect();
    assert_eq!(closed.len(), 1, "one access line: {lines:?}");
    let line = closed[0];
    assert_eq!(line["span"]["id"].to_string(), session.conn_id, "{line}");
    assert_eq!(
        line["spans"][0], line["span"],
        "the span list names it too: {line}"
    );
    assert_eq!(line["route"], "/", "{line}");
    assert_eq!(line["path"], "/", "{line}");
    assert_eq!(line["http"], "1.1", "{line}");
    assert_eq!(line["by"], "client", "{line}");
    assert_eq!(line["code"], "none", "a close without a status: {line}");
    assert!(
        line["backend"]
            .as_str()
            .unwrap()
            .starts_with("ws://127.0.0.1:"),
        "{line}"
    );
    assert!(
        line["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{line}"
    );
    for (field, value) in [
        ("messages_in", 1),
        ("messages_out", 1),
        ("bytes_in", 5),
        ("bytes_out", 5),
    ] {
        assert_eq!(line[field], value, "{field}: {line}");
    }
}

#[tokio::test]
async fn rust_log_warn_suppresses_the_info_lines() {
    let lines = json_lines(&one_session_with_json_logs("warn").await);
    for line in &lines {
        let level = line["level"].as_str().unwrap_or_default();
        assert!(
            level == "WARN" || level == "ERROR",
            "RUST_LOG=warn let through: {line}"
        );
    }
}

#[tokio::test]
async fn sighup_without_a_config_file_keeps_the_relay_running() {
    let backend = TestBackend::start("alpha").await;
    let addr = unused_addr();
    let mut relay = RelayProcess::spawn(
        &["--listen", &addr.to_string(), "--backend", &backend.url()],
        "info",
    );
    relay.wait_listening(addr).await;
    // A full round trip means the process is past startup and has its signal handlers.
    let mut client = connect(&format!("ws://{addr}/")).await;
    assert_eq!(round_trip(&mut client, "before").await, "before");

    relay.signal("HUP");
    relay
        .wait_stderr("the reload warning", |l| l.contains("nothing to reload"))
        .await;
    assert!(relay.is_running(), "SIGHUP stopped wsrelay");
    assert_eq!(round_trip(&mut client, "after").await, "after");
    keep_reading(client);
    relay.signal("TERM");
    let status = relay.wait_exit().await;
    assert!(status.success(), "{status:?}");
}

/// The certificate a TLS listener at `addr` presents, trusting `ca`.
async fn presented_certificate(
    addr: SocketAddr,
    ca: &TestCa,
) -> tokio_rustls::rustls::pki_types::CertificateDer<'static> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.ca_der()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

#[tokio::test]
async fn sighup_rotates_the_listener_certificate_and_refuses_a_bad_pair() {
    let backend = TestBackend::start("alpha").await;
    let ca = TestCa::new("rotation");
    let dir = TempDir::new();
    let addr = unused_addr();
    // Relative paths: beside the config file.
    let install = |stem: &str| {
        let issued = ca.issue(stem, &["localhost"]);
        std::fs::copy(&issued.cert_path, dir.path().join("listener.pem")).unwrap();
        std::fs::copy(&issued.key_path, dir.path().join("listener-key.pem")).unwrap();
        issued
    };
    let first = install("first");
    let source = config(
        "tls_cert = \"listener.pem\"\ntls_key = \"listener-key.pem\"",
        "",
        &[backend.url()],
    )
    .replace("127.0.0.1:0", &addr.to_string());
    let path = dir.write("relay.toml", &source);
    let mut relay = RelayProcess::spawn(&["--config", path.to_str().unwrap()], "info");
    relay.wait_listening(addr).await;
    assert_eq!(presented_certificate(addr, &ca).await, first.der);
    let reloads = |relay: &RelayProcess, what: &str| {
        relay
            .stderr()
            .iter()
            .filter(|line| line.contains(what))
            .count()
    };

    // Renewed in place: the next handshake gets the new certificate.
    let second = install("second");
    relay.signal("HUP");
    let deadline = Instant::now() + WAIT;
    while reloads(&relay, "configuration reloaded") == 0 {
        assert!(Instant::now() < deadline, "no reload: {:?}", relay.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(presented_certificate(addr, &ca).await, second.der);
    let log = relay.stderr().join("\n");
    assert!(
        log.contains("listener certificate: re-read, changed"),
        "SIGHUP's line says the certificate changed: {log}"
    );

    // A key that is not the certificate's: refused with the reason, the second one stays.
    std::fs::copy(&first.key_path, dir.path().join("listener-key.pem")).unwrap();
    relay.signal("HUP");
    wait_until("the refusal", || reloads(&relay, "reload refused") == 1).await;
    let log = relay.stderr().join("\n");
    assert!(log.contains("server.tls_key"), "{log}");
    assert!(log.contains("TLS certificate and key"), "{log}");
    assert!(relay.is_running());
    assert_eq!(presented_certificate(addr, &ca).await, second.der);
    relay.signal("TERM");
    assert!(relay.wait_exit().await.success());
}

#[tokio::test]
async fn sighup_reloads_the_config_file_and_a_bad_file_keeps_the_running_config() {
    let alpha = TestBackend::start("alpha").await;
    let bravo = TestBackend::start("bravo").await;
    let dir = TempDir::new();
    let addr = unused_addr();
    let with = |backend: &TestBackend| {
        config("shutdown_grace = \"1s\"", "", &[backend.url()])
            .replace("127.0.0.1:0", &addr.to_string())
    };
    let path = dir.write("relay.toml", &with(&alpha));
    let mut relay = RelayProcess::spawn(&["--config", path.to_str().unwrap()], "info");
    relay.wait_listening(addr).await;
    let mut settled = connect(&format!("ws://{addr}/")).await;
    assert_eq!(round_trip(&mut settled, "whoami").await, "alpha");

    // Replace alpha by bravo: new clients go to bravo at once...
    dir.write("relay.toml", &with(&bravo));
    relay.signal("HUP");
    relay
        .wait_stderr("the reload", |l| l.contains("configuration reloaded"))
        .await;
    let mut newcomer = connect(&format!("ws://{addr}/")).await;
    assert_eq!(round_trip(&mut newcomer, "whoami").await, "bravo");
    // ...and the client on the removed backend moves there after the grace, same socket.
    let deadline = Instant::now() + WAIT;
    while round_trip(&mut settled, "whoami").await != "bravo" {
        assert!(Instant::now() < deadline, "the settled client never moved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A broken file is refused, and the running configuration stays.
    dir.write("relay.toml", "[server\nlisten = ");
    relay.signal("HUP");
    relay
        .wait_stderr("the refusal", |l| l.contains("reload refused"))
        .await;
    assert!(relay.is_running());
    let mut after = connect(&format!("ws://{addr}/")).await;
    assert_eq!(round_trip(&mut after, "whoami").await, "bravo");

    for client in [settled, newcomer, after] {
        keep_reading(client);
    }
    relay.signal("TERM");
    assert!(relay.wait_exit().await.success());
}

/// Starts `wsrelay demo` and waits for its banner; returns the process and the relay address.
async fn start_demo() -> (RelayProcess, SocketAddr) {
    let addr = unused_addr();
    let mut relay = RelayProcess::spawn(&["demo", "--listen", &addr.to_string()], "info");
    relay.wait_listening(addr).await;
    let names = ["alpha", "bravo", "charlie"];
    wait_until("the demo banner", || {
        let stdout = relay.stdout();
        stdout
            .iter()
            .any(|l| l.contains(&format!("http://{addr}/")))
            && names
                .iter()
                .all(|name| stdout.iter().any(|l| l.trim_start().starts_with(name)))
    })
    .await;
    (relay, addr)
}

/// The status line, headers and body of a plain `GET path`.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut answer))
        .await
        .expect("the answer in time")
        .unwrap();
    answer
}

/// The next JSON message of `kind` a demo chat client gets (others are skipped).
async fn next_of(client: &mut Client, kind: &str) -> serde_json::Value {
    let wait = async {
        loop {
            match client.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => {
                    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
                    if value["type"] == kind {
                        return value;
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("the chat socket ended while waiting for {kind}: {other:?}"),
            }
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .unwrap_or_else(|_| panic!("no {kind} message in time"))
}

#[tokio::test]
async fn demo_prints_its_url_and_backends_and_a_user_sticks_to_one_echo_backend() {
    let (mut relay, addr) = start_demo().await;
    let names = ["alpha", "bravo", "charlie"];
    let mut first = connect(&format!("ws://{addr}/echo?user=x")).await;
    let name = round_trip(&mut first, "whoami").await;
    assert!(names.contains(&name.as_str()), "whoami answered {name:?}");
    let mut again = connect(&format!("ws://{addr}/echo?user=x")).await;
    assert_eq!(round_trip(&mut again, "whoami").await, name);

    keep_reading(first);
    keep_reading(again);
    relay.signal("TERM");
    let status = relay.wait_exit().await;
    assert!(status.success(), "{status:?}: {:?}", relay.stderr());
}

#[tokio::test]
async fn demo_serves_its_chat_page_and_chatters_keep_their_sockets_when_a_backend_is_killed() {
    let (mut relay, addr) = start_demo().await;
    let page = http_get(addr, "/").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.to_lowercase().contains("content-type: text/html"),
        "{page}"
    );
    assert!(page.contains("<script src=\"/chat.js\">"), "{page}");
    let script = http_get(addr, "/chat.js").await;
    assert!(
        script
            .to_lowercase()
            .contains("content-type: text/javascript"),
        "{script}"
    );
    assert!(
        http_get(addr, "/missing.png")
            .await
            .starts_with("HTTP/1.1 404")
    );

    let chat = |user: &str| format!("ws://{addr}/chat?room=test&user={user}");
    let mut ann = connect(&chat("ann")).await;
    let mut bob = connect(&chat("bob")).await;
    let ann_welcome = next_of(&mut ann, "welcome").await;
    let bob_welcome = next_of(&mut bob, "welcome").await;
    let ann_backend = ann_welcome["backend"].as_str().unwrap().to_owned();
    assert_eq!(ann_welcome["resumed"], false);
    assert!(
        ann_welcome["tap"]
            .as_str()
            .unwrap()
            .contains("/api/tap?conn="),
        "{ann_welcome}"
    );

    let say = |id: &str, text: &str| {
        tokio_tungstenite::tungstenite::Message::text(
            serde_json::json!({"type": "say", "id": id, "text": text}).to_string(),
        )
    };
    use futures_util::SinkExt;
    ann.send(say("a-1", "hello bob")).await.unwrap();
    let line = next_of(&mut bob, "line").await;
    assert_eq!(
        (&line["nick"], &line["text"]),
        (&"ann".into(), &"hello bob".into())
    );

    // Kill the backend serving ann: she keeps her socket and is welcomed by another one.
    ann.send(tokio_tungstenite::tungstenite::Message::text(format!(
        "/kill {ann_backend}"
    )))
    .await
    .unwrap();
    let moved = next_of(&mut ann, "welcome").await;
    assert_ne!(moved["backend"], ann_backend.as_str(), "{moved}");
    assert_eq!(moved["resumed"], true);
    assert_eq!(
        moved["conn"], ann_welcome["conn"],
        "the same relay connection"
    );
    relay
        .wait_stderr("the kill to be logged", |l| {
            l.contains("demo backend killed") && l.contains(&ann_backend)
        })
        .await;

    ann.send(say("a-2", "still here")).await.unwrap();
    loop {
        let line = next_of(&mut bob, "line").await;
        if line["text"] == "still here" {
            assert_ne!(line["via"], ann_backend.as_str());
            break;
        }
    }
    // Bob's socket stayed open too, wherever he was served.
    assert_eq!(bob_welcome["room"], "test");
    bob.send(say("b-1", "me too")).await.unwrap();
    loop {
        if next_of(&mut ann, "line").await["text"] == "me too" {
            break;
        }
    }

    keep_reading(ann);
    keep_reading(bob);
    relay.signal("TERM");
    let status = relay.wait_exit().await;
    assert!(status.success(), "{status:?}: {:?}", relay.stderr());
}

#[tokio::test]
async fn tap_prints_one_readable_line_per_frame_of_the_route() {
    let backend = TestBackend::start("alpha").await;
    let dir = TempDir::new();
    let port = unused_addr().port();
    let admin_port = unused_addr().port();
    let source = config(
        &format!("admin = \"127.0.0.1:{admin_port}\""),
        "",
        &[backend.url()],
    );
    let path = dir.write("tap.toml", &source);
    let listen = format!("127.0.0.1:{port}");
    let mut relay = RelayProcess::spawn(
        &["--config", path.to_str().unwrap(), "--listen", &listen],
        "info",
    );
    relay.wait_listening(listen.parse().unwrap()).await;
    let admin = format!("127.0.0.1:{admin_port}");
    let mut tap = RelayProcess::spawn(&["tap", "--admin", &admin, "--route", "/"], "info");
    tap.wait_stderr("the tap to open", |line| line.contains("tapping route / "))
        .await;
    // The tap subscribes just after it prints; retry until a frame shows up in it.
    let mut client = connect(&format!("ws://{listen}/room")).await;
    let deadline = Instant::now() + WAIT;
    loop {
        assert_eq!(round_trip(&mut client, "hello tap").await, "hello tap");
        let lines = tap.stdout();
        let inbound = lines
            .iter()
            .find(|l| l.contains("client -> backend") && l.contains("hello tap"));
        let outbound = lines
            .iter()
            .find(|l| l.contains("backend -> client") && l.contains("hello tap"));
        if let (Some(inbound), Some(_)) = (inbound, outbound) {
            assert!(inbound.contains("text"), "{inbound}");
            assert!(inbound.contains(" 9 B"), "{inbound}");
            break;
        }
        assert!(Instant::now() < deadline, "tap printed {lines:?}");
        assert!(tap.is_running(), "tap exited: {:?}", tap.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tap.signal("TERM");
    assert!(tap.wait_exit().await.success());
    keep_reading(client);
    relay.signal("TERM");
    assert!(relay.wait_exit().await.success());
}

#[test]
fn check_lists_every_problem_of_a_file_in_one_run() {
    let source = r#"[server]
listen = "127.0.0.1:0"
admin = "0.0.0.0:9090"
max_connections = "many"

[[route]]
path = "/"
upstream = "chat"
hash_key = "bogus"

[upstream.chat]
backends = ["http://127.0.0.1:9001", "ws://127.0.0.1:9002"]
"#;
    let (code, stdout, stderr) = check(source);
    assert_eq!(code, Some(1), "stdout: {stdout}\nstderr: {stderr}");
    // Types, values inside a list, and a cross-key rule, each with its line and the line.
    for (line, says) in [
        (3, "needs server.admin_token"),
        (4, "\"many\""),
        (9, "invalid hash_key \"bogus\""),
        (12, "must start with ws://"),
    ] {
        let found = stdout
            .lines()
            .any(|l| l.contains(&format!("line {line}:")) && l.contains(says));
        assert!(found, "line {line} ({says}) missing in:\n{stdout}");
    }
    assert!(stderr.contains("4 problems"), "{stderr}");
}

#[test]
fn commands_show_and_take_only_the_options_they_use() {
    let demo = run_to_end(&["demo", "--config", "/nonexistent.toml"]);
    assert_eq!(demo.status.code(), Some(2));
    assert!(
        text(&demo.stderr).contains("unexpected argument '--config'"),
        "{}",
        text(&demo.stderr)
    );
    let check = run_to_end(&["check"]);
    assert_eq!(check.status.code(), Some(2));
    assert!(
        text(&check.stderr).contains("--config <FILE>"),
        "{}",
        text(&check.stderr)
    );
    let help = text(&run_to_end(&["tap", "--help"]).stdout);
    assert!(!help.contains("--config"), "{help}");
    assert!(help.contains("--admin"), "{help}");
    let help = text(&run_to_end(&["--help"]).stdout);
    assert!(
        help.contains("0.0.0.0:8080"),
        "the quick start's default address: {help}"
    );
}

#[test]
fn a_taken_port_is_named_once_with_what_to_do() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = run_to_end(&["--listen", &addr, "--backend", "ws://127.0.0.1:9"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains(&addr), "{stderr}");
    assert!(stderr.contains("--listen"), "says what to do: {stderr}");
}

// Multi-threaded: the blocking `wsrelay tap` runs must not stall the test's backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_says_when_nothing_matches_or_it_is_not_at_the_admin_listener() {
    let backend = TestBackend::start("alpha").await;
    let dir = TempDir::new();
    let listen = unused_addr();
    let admin = unused_addr();
    let source = config(&format!("admin = \"{admin}\""), "", &[backend.url()]);
    let path = dir.write("tap.toml", &source);
    let listen_text = listen.to_string();
    let mut relay = RelayProcess::spawn(
        &["--config", path.to_str().unwrap(), "--listen", &listen_text],
        "info",
    );
    relay.wait_listening(listen).await;
    relay.wait_listening(admin).await;
    let admin = admin.to_string();

    let nothing = run_to_end(&["tap", "--admin", &admin, "--route", "/nothing-here"]);
    let stderr = text(&nothing.stderr);
    assert_eq!(nothing.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no route has the path \"/nothing-here\""),
        "{stderr}"
    );
    assert!(stderr.contains("the routes are: /"), "{stderr}");

    // The client listener passes /api/tap to its backend, which upgrades: not a tap.
    let wrong = run_to_end(&["tap", "--admin", &listen_text, "--route", "/"]);
    let stderr = text(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not a relay's admin listener"), "{stderr}");

    let nobody = unused_addr().to_string();
    let refused = run_to_end(&["tap", "--admin", &nobody, "--route", "/"]);
    let stderr = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.matches("Connection refused").count(), 1, "{stderr}");
    assert!(stderr.contains("[server] admin"), "{stderr}");
}

/// A dial's lines are in the span of the client's connection id too, though a session keeps
/// no span while it lives: each line makes its own.
#[tokio::test]
async fn a_failed_dial_is_logged_in_the_span_of_its_connection() {
    let addr = unused_addr();
    let nobody = unused_addr();
    let mut relay = RelayProcess::spawn(
        &[
            "--log-format",
            "json",
            "--listen",
            &addr.to_string(),
            "--backend",
            &format!("ws://{nobody}"),
        ],
        "info",
    );
    relay.wait_listening(addr).await;
    let refused = tokio_tungstenite::connect_async(format!("ws://{addr}/")).await;
    assert!(refused.is_err(), "no backend, yet the client was upgraded");
    relay
        .wait_stderr("the failed dial's line", |l| {
            l.contains("backend unreachable")
        })
        .await;
    relay.signal("TERM");
    assert!(relay.wait_exit().await.success());
    let lines = json_lines(&relay.stderr());
    let line = lines
        .iter()
        .find(|l| l["message"] == "backend unreachable")
        .unwrap();
    assert_eq!(line["span"]["name"], "conn", "{line}");
    assert!(line["span"]["id"].is_u64(), "{line}");
    assert_eq!(
        line["spans"][0], line["span"],
        "the span list names it too: {line}"
    );
}

#[tokio::test]
async fn text_logs_to_a_pipe_are_plain_with_values_in_their_display_form() {
    let OneSession { addr, lines, .. } = one_session("text", "info").await;
    assert!(
        lines.iter().all(|l| !l.contains('\u{1b}')),
        "colour codes in {lines:?}"
    );
    assert!(
        lines.iter().all(|l| !l.contains("Some(")),
        "debug forms in {lines:?}"
    );
    let closed = lines.iter().find(|l| l.contains("session closed")).unwrap();
    let seconds = closed
        .split_whitespace()
        .find_map(|field| field.strip_prefix("seconds="))
        .unwrap_or_else(|| panic!("no seconds in {closed}"));
    let decimals = seconds.split_once('.').map_or(0, |(_, d)| d.len());
    assert_eq!(decimals, 3, "rounded to milliseconds: {closed}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("local_addr={addr}"))),
        "addresses plain: {lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_relay_says_so_once_and_recovers() {
    let backend = TestBackend::start("alpha").await;
    let addr = unused_addr();
    let listen = addr.to_string();
    let url = backend.url();
    let mut relay =
        RelayProcess::spawn_with_file_limit(48, &["--listen", &listen, "--backend", &url], "info");
    relay.wait_listening(addr).await;
    // Idle connections, each an open file in the relay, until it can take no more: the rest
    // wait in the kernel's accept queue while the relay backs off.
    let mut idle = Vec::new();
    for _ in 0..80 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    relay
        .wait_stderr("the accept failure", |l| l.contains("accept failed"))
        .await;
    // The streak goes on while the connections stay; it is reported once.
    let streak = Instant::now() + Duration::from_millis(300);
    while Instant::now() < streak {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failures = |lines: &[String]| lines.iter().filter(|l| l.contains("accept failed")).count();
    assert_eq!(failures(&relay.stderr()), 1, "{:?}", relay.stderr());
    drop(idle);
    relay
        .wait_stderr("accepting again", |l| {
            l.contains("accepting connections again")
        })
        .await;
    // The relay first accepts the queued connections the test just closed, which hold files
    // again for a moment; a client that comes meanwhile may find no file to dial its backend
    // with (502), so it tries again, as clients do.
    let url = format!("ws://{addr}/");
    let mut client = retry("a client to get through", || {
        tokio_tungstenite::connect_async(url.clone())
    })
    .await
    .0;
    assert_eq!(round_trip(&mut client, "still here").await, "still here");
    assert!(relay.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wsrelay_reload_applies_the_file_or_says_why_not() {
    let alpha = TestBackend::start("alpha").await;
    let bravo = TestBackend::start("bravo").await;
    let dir = TempDir::new();
    let addr = unused_addr();
    let admin = unused_addr();
    // The file says 127.0.0.1:0 and --listen overrides it: a reload keeps the override, and
    // does not report `listen` as waiting for a restart.
    let with =
        |backend: &TestBackend| config(&format!("admin = \"{admin}\""), "", &[backend.url()]);
    let path = dir.write("relay.toml", &with(&alpha));
    let listen = addr.to_string();
    let mut relay = RelayProcess::spawn(
        &["--config", path.to_str().unwrap(), "--listen", &listen],
        "info",
    );
    relay.wait_listening(addr).await;
    relay.wait_listening(admin).await;
    let admin = admin.to_string();

    dir.write("relay.toml", &with(&bravo));
    let reloaded = run_to_end(&["reload", "--admin", &admin]);
    let stdout = text(&reloaded.stdout);
    assert_eq!(
        reloaded.status.code(),
        Some(0),
        "{stdout}{}",
        text(&reloaded.stderr)
    );
    assert!(stdout.contains("reloaded: 1 routes"), "{stdout}");
    assert!(
        !stdout.contains("restart"),
        "nothing waits for a restart: {stdout}"
    );
    assert!(
        stdout.contains(&format!("added: {}", bravo.url())),
        "{stdout}"
    );
    let mut client = connect(&format!("ws://{addr}/")).await;
    assert_eq!(round_trip(&mut client, "whoami").await, "bravo");

    dir.write("relay.toml", "[server\nlisten = ");
    let refused = run_to_end(&["reload", "--admin", &admin]);
    let stderr = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("refused the reload"), "{stderr}");
    assert!(stderr.contains("line 1"), "names the problem: {stderr}");

    let nobody = unused_addr().to_string();
    let unreachable = run_to_end(&["reload", "--admin", &nobody]);
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(text(&unreachable.stderr).contains("[server] admin"));

    keep_reading(client);
    relay.signal("TERM");
    assert!(relay.wait_exit().await.success());
}
