//! The admin listener (docs/operations.md, "Admin API"): metrics that move as connections come and go, the
//! connections and backends API, the live tap, backend drains, readiness and the token.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsrelay_testkit::*;

/// A plain HTTP/1.1 request to the admin listener; returns (status, body).
async fn admin(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\n{auth}Connection: close\r\nContent-Length: 0\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status_of(&response), body)
}

fn config(extra_server: &str, extra_upstream: &str) -> String {
    format!(
        r#"
[server]
admin = "127.0.0.1:0"
{extra_server}

[[route]]
path = "/chat"
upstream = "main"
hash_key = "header:X-User"

[upstream.main]
backends = BACKENDS
{extra_upstream}
"#
    )
}

fn admin_addr(relay: &TestRelay) -> SocketAddr {
    relay.handle.admin_addr().expect("admin listener")
}

/// The value of a Prometheus sample line that starts with `series`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

/// Connects to the relay's `/chat/room` as `user`.
async fn chat_as(relay: &TestRelay, user: &str) -> Client {
    connect_as(&relay.url("/chat/room"), user).await
}

type Tap = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a live tap of the route `/chat` on the admin listener at `addr`.
async fn tap_chat(addr: SocketAddr) -> Tap {
    let url = format!("ws://{addr}/api/tap?route=%2Fchat");
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// The next record of a tap.
async fn next_record(tap: &mut Tap) -> serde_json::Value {
    let message = within("a tap record", tap.next()).await.unwrap().unwrap();
    serde_json::from_str(message.to_text().unwrap()).unwrap()
}

#[tokio::test]
async fn metrics_move_as_connections_come_and_go() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(&config("", ""), &[&backend]).await;
    let addr = admin_addr(&relay);
    let active = format!(
        "wsrelay_connections_active{{route=\"/chat\",backend=\"{}\"}}",
        backend.url()
    );

    let mut clients = Vec::new();
    for n in 0..3 {
        let mut client = chat_as(&relay, &format!("u{n}")).await;
        for i in 0..4 {
            assert_eq!(
                round_trip(&mut client, &format!("m{i}")).await,
                format!("m{i}")
            );
        }
        clients.push(client);
    }
    let (status, metrics) = admin(addr, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    assert_eq!(sample(&metrics, &active), Some(3.0), "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            "wsrelay_handshakes_total{outcome=\"upgraded\",status=\"101\"}"
        ),
        Some(3.0)
    );

    for mut client in clients {
        client.close(None).await.unwrap();
        let _ = expect_close(&mut client).await;
    }
    wait_until("sessions to end", || relay.handle.open_sessions() == 0).await;
    let (_, metrics) = admin(addr, "GET", "/metrics", None).await;
    assert_eq!(sample(&metrics, &active), Some(0.0), "{metrics}");
    assert_eq!(
        sample(&metrics, "wsrelay_messages_total{direction=\"in\"}"),
        Some(12.0)
    );
    assert_eq!(
        sample(&metrics, "wsrelay_messages_total{direction=\"out\"}"),
        Some(12.0)
    );
    assert_eq!(
        sample(&metrics, "wsrelay_bytes_total{direction=\"in\"}"),
        Some(24.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "wsrelay_closes_total{by=\"client\",code=\"none\"}"
        ),
        Some(3.0)
    );

    // A refused handshake is counted by outcome and status.
    assert_eq!(refused_status(&relay.url("/nowhere")).await, 404);
    let (_, metrics) = admin(addr, "GET", "/metrics", None).await;
    assert_eq!(
        sample(
            &metrics,
            "wsrelay_handshakes_total{outcome=\"refused\",status=\"404\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn connections_and_backends_are_listed_as_json() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let relay = TestRelay::start(&config("", ""), &[&a, &b]).await;
    let addr = admin_addr(&relay);
    let urls = [a.url(), b.url()];
    let mut client = chat_as(&relay, &user_ranked_first(&urls, 1)).await;
    assert_eq!(round_trip(&mut client, "hello").await, "hello");

    let (status, body) = admin(addr, "GET", "/api/connections", None).await;
    assert_eq!(status, 200);
    let rows: serde_json::Value = serde_json::from_str(&body).unwrap();
    let row = &rows[0];
    assert_eq!(row["route"], "/chat");
    assert_eq!(row["path"], "/chat/room");
    assert_eq!(row["backend"], b.url());
    assert_eq!(row["mode"], "per-client");
    assert!(
        row["client_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert_eq!(row["messages_in"], 1);
    assert_eq!(row["bytes_out"], 5);

    let (_, body) = admin(addr, "GET", "/api/backends", None).await;
    let rows: serde_json::Value = serde_json::from_str(&body).unwrap();
    let find = |url: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["url"] == url)
            .cloned()
            .unwrap()
    };
    assert_eq!(find(&b.url())["connections"], 1);
    assert_eq!(find(&a.url())["connections"], 0);
    assert_eq!(find(&a.url())["healthy"], true);
    assert_eq!(find(&a.url())["upstream"], "main");
}

#[tokio::test]
async fn a_route_tap_streams_the_exact_frames_a_client_sent() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(&config("", ""), &[&backend]).await;
    let addr = admin_addr(&relay);
    let mut tap = tap_chat(addr).await;
    let mut client = chat_as(&relay, "ann").await;
    // The relay answers a client's ping itself, and the backend's pongs answer the relay's own
    // pings: none of them crosses, so the tap shows none.
    client
        .send(Message::Ping("are you there".into()))
        .await
        .unwrap();
    assert_eq!(
        round_trip(&mut client, "{\"say\":\"hi\"}").await,
        "{\"say\":\"hi\"}"
    );
    client
        .send(Message::binary(vec![0xca, 0xfe]))
        .await
        .unwrap();
    let _ = next_data(&mut client).await;

    let mut records = Vec::new();
    while records.len() < 4 {
        let record = next_record(&mut tap).await;
        assert!(
            record["opcode"] == "text" || record["opcode"] == "binary",
            "only frames that cross: {record}"
        );
        records.push(record);
    }
    assert_eq!(records[0]["direction"], "in");
    assert_eq!(records[0]["opcode"], "text");
    assert_eq!(records[0]["preview"], "{\"say\":\"hi\"}");
    assert_eq!(records[0]["len"], 12);
    assert_eq!(records[0]["route"], "/chat");
    assert_eq!(records[1]["direction"], "out");
    assert_eq!(records[2]["opcode"], "binary");
    assert_eq!(records[2]["preview"], "cafe");
    // A tap on another connection id sees none of this.
    assert!(records.iter().all(|r| r["conn"] == records[0]["conn"]));
}

#[tokio::test]
async fn a_drained_backend_gets_no_new_clients_and_its_clients_move_after_the_grace() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let relay = TestRelay::start(&config("shutdown_grace = \"1s\"", ""), &[&a, &b]).await;
    let addr = admin_addr(&relay);
    let urls = [a.url(), b.url()];
    let user = user_ranked_first(&urls, 0);
    let mut settled = chat_as(&relay, &user).await;
    assert_eq!(round_trip(&mut settled, "whoami").await, "a");

    let encoded = a.url().replace(':', "%3A").replace('/', "%2F");
    let (status, _) = admin(
        addr,
        "POST",
        &format!("/api/backends/drain?url={encoded}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    // New clients of the same user skip the draining backend at once.
    let mut newcomer = chat_as(&relay, &user).await;
    assert_eq!(round_trip(&mut newcomer, "whoami").await, "b");
    // The settled client is moved once the grace period has passed, keeping its socket.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if round_trip(&mut settled, "whoami").await == "b" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never moved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, body) = admin(addr, "GET", "/api/backends", None).await;
    assert!(body.contains("\"draining\": true"), "{body}");
    let (status, _) = admin(
        addr,
        "POST",
        "/api/backends/drain?url=ws%3A%2F%2Fnope%3A1",
        None,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn readyz_flips_to_503_while_the_relay_drains() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(&config("shutdown_grace = \"3s\"", ""), &[&backend]).await;
    let addr = admin_addr(&relay);
    assert_eq!(admin(addr, "GET", "/readyz", None).await.0, 200);
    assert_eq!(admin(addr, "GET", "/healthz", None).await.0, 200);
    // A client that never completes the close keeps the drain going for the grace period.
    let _stuck = RawClient::connect(relay.addr(), "/chat").await;
    wait_until("the session", || relay.handle.open_sessions() == 1).await;
    let shutdown = tokio::spawn(relay.handle.shutdown());
    let deadline = tokio::time::Instant::now() + WAIT;
    while admin(addr, "GET", "/readyz", None).await.0 != 503 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz never flipped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.await.unwrap();
}

#[tokio::test]
async fn the_admin_token_is_enforced() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(&config("admin_token = \"s3cret\"", ""), &[&backend]).await;
    let addr = admin_addr(&relay);
    assert_eq!(admin(addr, "GET", "/metrics", None).await.0, 401);
    assert_eq!(admin(addr, "GET", "/metrics", Some("wrong")).await.0, 401);
    assert_eq!(admin(addr, "GET", "/metrics", Some("s3cret")).await.0, 200);
    assert_eq!(admin(addr, "GET", "/nope", Some("s3cret")).await.0, 404);
    // Started without a file, there is nothing to reload.
    assert_eq!(
        admin(addr, "POST", "/api/reload", Some("s3cret")).await.0,
        409
    );
    // The tap needs the token too.
    let refused =
        tokio_tungstenite::connect_async(format!("ws://{addr}/api/tap?route=%2Fchat")).await;
    assert!(refused.is_err());
}

#[tokio::test]
async fn a_public_admin_listener_without_a_token_is_refused() {
    let source = r#"
[server]
listen = "127.0.0.1:0"
admin = "0.0.0.0:9090"

[[route]]
path = "/"
upstream = "main"

[upstream.main]
backends = ["ws://127.0.0.1:9"]
"#;
    let error = wsrelay::config::Config::from_toml(source, "t.toml")
        .unwrap_err()
        .to_string();
    assert!(error.contains("line 4: server.admin"), "{error}");
    assert!(error.contains("needs server.admin_token"), "{error}");
    let with_token = source.replace("admin = ", "admin_token = \"t\"\nadmin = ");
    assert!(wsrelay::config::Config::from_toml(&with_token, "t.toml").is_ok());
}

#[tokio::test]
async fn post_reload_applies_a_new_route_and_refuses_a_broken_file() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let dir = TempDir::new();
    let server = "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n";
    let one = format!(
        "[[route]]\npath = \"/\"\nupstream = \"one\"\n\n[upstream.one]\nbackends = [\"{}\"]\n",
        a.url()
    );
    let two = format!(
        "[[route]]\npath = \"/two\"\nupstream = \"two\"\n\n[upstream.two]\nbackends = [\"{}\"]\n",
        b.url()
    );
    let path = dir.write("relay.toml", &format!("{server}{one}"));
    let relay = TestRelay::start_with(&format!("{server}{one}"), &[], |builder| {
        builder.config_path(&path)
    })
    .await;
    let addr = admin_addr(&relay);
    let whoami = |path: &'static str| {
        let url = relay.url(path);
        async move {
            let mut client = connect(&url).await;
            round_trip(&mut client, "whoami").await
        }
    };
    assert_eq!(whoami("/two/x").await, "a");

    dir.write("relay.toml", &format!("{server}{two}\n{one}"));
    let (status, body) = admin(addr, "POST", "/api/reload", None).await;
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["added"][0], b.url());
    assert_eq!(report["routes"], 2);
    assert_eq!(whoami("/two/x").await, "b");
    assert_eq!(whoami("/x").await, "a");

    dir.write("relay.toml", "[[route]]\npath = 7\n");
    let (status, body) = admin(addr, "POST", "/api/reload", None).await;
    assert_eq!(status, 400);
    assert!(body.contains("line 2"), "{body}");
    assert_eq!(whoami("/two/x").await, "b");
}

#[tokio::test]
async fn a_sensitive_route_taps_lengths_but_no_payload() {
    let backend = TestBackend::start("b").await;
    let toml = config("", "").replace(
        "hash_key = \"header:X-User\"",
        "hash_key = \"header:X-User\"\nsensitive = true\ninspect = [\"log\"]",
    );
    let relay = TestRelay::start(&toml, &[&backend]).await;
    let addr = admin_addr(&relay);
    let mut tap = tap_chat(addr).await;
    let mut client = chat_as(&relay, "ann").await;
    assert_eq!(
        round_trip(&mut client, "secret-token").await,
        "secret-token"
    );
    let record = loop {
        let record = next_record(&mut tap).await;
        if record["opcode"] == "text" {
            break record;
        }
    };
    assert_eq!(record["len"], 12);
    assert_eq!(record["preview"], "");
}

#[tokio::test]
async fn metrics_move_while_a_connection_stays_open() {
    let backend = TestBackend::start("b").await;
    // No keepalive tick and no close: only a scrape that reads live sessions sees traffic.
    let toml = config("", "").replace(
        "[server]",
        "[keepalive]\nping_interval = \"0s\"\n\n[server]",
    );
    let relay = TestRelay::start(&toml, &[&backend]).await;
    let addr = admin_addr(&relay);
    let mut client = chat_as(&relay, "steady").await;
    for expected in 1..=3u32 {
        assert_eq!(round_trip(&mut client, "12345").await, "12345");
        let (_, metrics) = admin(addr, "GET", "/metrics", None).await;
        let moved = |series: &str| sample(&metrics, series);
        assert_eq!(
            moved("wsrelay_messages_total{direction=\"in\"}"),
            Some(f64::from(expected)),
            "{metrics}"
        );
        assert_eq!(
            moved("wsrelay_bytes_total{direction=\"out\"}"),
            Some(f64::from(5 * expected)),
            "{metrics}"
        );
    }
    assert_eq!(
        relay.handle.open_sessions(),
        1,
        "the connection is still open"
    );
}

#[tokio::test]
async fn handshake_metrics_tell_refusals_apart() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(&config("max_connections = 1", ""), &[&backend]).await;
    let addr = admin_addr(&relay);
    let outcome = |metrics: &str, outcome: &str, status: u16| {
        sample(
            metrics,
            &format!("wsrelay_handshakes_total{{outcome=\"{outcome}\",status=\"{status}\"}}"),
        )
    };

    // The one slot taken: the next client gets 503 for capacity.
    let mut held = chat_as(&relay, "first").await;
    assert_eq!(round_trip(&mut held, "hi").await, "hi");
    assert_eq!(refused_status(&relay.url("/chat")).await, 503);
    held.close(None).await.unwrap();
    let _ = expect_close(&mut held).await;
    wait_until("the slot to free", || relay.handle.open_sessions() == 0).await;

    // The only backend drained: 503 because no backend may take clients.
    let drain = format!(
        "/api/backends/drain?url={}",
        backend.url().replace(':', "%3A").replace('/', "%2F")
    );
    assert_eq!(admin(addr, "POST", &drain, None).await.0, 200);
    // The closed session's slot returns just after it leaves the registry: until then the
    // answer is still "over capacity", so look for the first "no healthy backend".
    let mut metrics = String::new();
    for _ in 0..200 {
        assert_eq!(refused_status(&relay.url("/chat")).await, 503);
        metrics = admin(addr, "GET", "/metrics", None).await.1;
        if outcome(&metrics, "no_healthy_backend", 503).is_some() {
            break;
        }
    }
    assert!(
        outcome(&metrics, "over_capacity", 503) >= Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        outcome(&metrics, "no_healthy_backend", 503),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(outcome(&metrics, "upgraded", 101), Some(1.0), "{metrics}");
}

#[tokio::test]
async fn a_key_only_a_restart_applies_is_reported_until_the_restart() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(&config("", ""), &[&backend]).await;
    let moved = config("listen = \"127.0.0.1:0\"\nmax_connections = 7", "")
        .replace("BACKENDS", &format!("[\"{}\"]", backend.url()));
    for reload in 1..=2 {
        let config = wsrelay::config::Config::from_toml(&moved, "t.toml").unwrap();
        let report = relay.handle.reload(config).await.unwrap();
        assert_eq!(
            report.restart_needed,
            ["server.max_connections"],
            "reload {reload}: the running value is still the old one"
        );
    }
}

#[tokio::test]
async fn delete_closes_one_connection_with_the_code_and_reason_asked_for() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(&config("", ""), &[&backend]).await;
    let addr = admin_addr(&relay);
    let mut doomed = chat_as(&relay, "doomed").await;
    let mut bystander = chat_as(&relay, "bystander").await;
    assert_eq!(round_trip(&mut doomed, "hi").await, "hi");
    assert_eq!(round_trip(&mut bystander, "hi").await, "hi");
    let (_, listed) = admin(addr, "GET", "/api/connections", None).await;
    let rows: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let id = rows.as_array().unwrap()[0]["id"].as_u64().unwrap();

    assert_eq!(
        admin(
            addr,
            "DELETE",
            &format!("/api/connections/{id}?code=1005"),
            None
        )
        .await
        .0,
        400
    );
    assert_eq!(
        admin(addr, "DELETE", "/api/connections/999999", None)
            .await
            .0,
        404
    );
    assert_eq!(
        admin(addr, "GET", &format!("/api/connections/{id}"), None)
            .await
            .0,
        405
    );
    let path = format!("/api/connections/{id}?code=4000&reason=moved%20on");
    assert_eq!(
        admin(addr, "DELETE", &path, None).await,
        (200, "closing\n".to_owned())
    );
    let frame = expect_close(&mut doomed).await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 4000);
    assert_eq!(frame.reason.as_str(), "moved on");
    wait_until("the backend leg to close 1001", || {
        backend
            .closes()
            .iter()
            .any(|c| c.as_ref().is_some_and(|f| u16::from(f.code) == 1001))
    })
    .await;
    assert_eq!(round_trip(&mut bystander, "still").await, "still");
}
