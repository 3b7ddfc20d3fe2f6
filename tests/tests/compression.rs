//! `compression = "client"`: permessage-deflate (RFC 7692) on the client leg. Real clients that
//! offer it (yawc's client, and Python's `websockets` when it is installed) get it, with both
//! no-context-takeover parameters and the window they asked for; the backend gets the
//! messages decompressed, and never sees the offer; the wire carries fewer bytes; a
//! decompression bomb is closed 1009 at `max_message_size`; `"off"` declines; a plain client
//! of the same route is unaffected.

use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use wsrelay_testkit::{
    CountedStream, TestBackend, TestRelay, WireCount, chat_message, connect, raw_exchange,
    round_trip, status_of, upgrade_request, wait_until,
};
use yawc::{CompressionLevel, DeflateOptions, Frame, OpCode, Options, WebSocket};

/// One route over `BACKENDS`, with `compression` as given, an admin listener and `limits`.
fn config(compression: &str, limits: &str) -> String {
    format!(
        r#"
[server]
admin = "127.0.0.1:0"

[limits]
{limits}

[[route]]
path = "/"
upstream = "main"
compression = "{compression}"

[upstream.main]
backends = BACKENDS
"#
    )
}

/// The answer of the relay to an upgrade request offering `offer` (no offer when empty): its
/// `Sec-WebSocket-Extensions`, if any.
async fn answered_extensions(relay: &TestRelay, offer: &str) -> Option<String> {
    let extra = if offer.is_empty() {
        String::new()
    } else {
        format!("Sec-WebSocket-Extensions: {offer}\r\n")
    };
    let response = raw_exchange(
        relay.addr(),
        &upgrade_request("/", &extra),
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(
        status_of(&response),
        101,
        "{}",
        String::from_utf8_lossy(&response)
    );
    let text = String::from_utf8_lossy(&response).into_owned();
    let head = text.split("\r\n\r\n").next().unwrap_or_default().to_owned();
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-extensions")
            .then(|| value.trim().to_owned())
    })
}

const BOTH: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// yawc's client options: offering permessage-deflate (`Some`, with the offer's settings) or
/// not.
fn client_options(deflate: Option<DeflateOptions>) -> Options {
    let options = Options::default().with_utf8();
    match deflate {
        Some(deflate) => Options {
            compression: Some(deflate),
            ..options
        },
        None => options.without_compression(),
    }
}

fn plain_offer() -> DeflateOptions {
    DeflateOptions {
        level: CompressionLevel::default(),
        ..DeflateOptions::default()
    }
}

/// A yawc client of `relay` at `/`, counting its bytes on the wire.
async fn yawc_client(
    relay: &TestRelay,
    options: Options,
) -> (WebSocket<CountedStream<TcpStream>>, WireCount) {
    let wire = WireCount::default();
    let tcp = TcpStream::connect(relay.addr()).await.unwrap();
    let io = CountedStream::new(tcp, wire.clone());
    let url = url::Url::parse(&relay.url("/")).unwrap();
    let ws = WebSocket::handshake(url, io, options).await.unwrap();
    (ws, wire)
}

/// The next data message's text (pings and pongs skipped), within a few seconds.
async fn next_text<S>(ws: &mut WebSocket<S>) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next_frame())
            .await
            .expect("a message in time")
            .expect("an open socket");
        match frame.opcode() {
            OpCode::Text => return frame.as_str().to_owned(),
            OpCode::Ping | OpCode::Pong => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// Sends `count` chat messages through `ws` one at a time, checking each echo; returns the
/// payload bytes sent plus received.
async fn chat<S>(ws: &mut WebSocket<S>, count: usize) -> u64
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut payload = 0;
    for i in 0..count {
        let message = chat_message(i);
        ws.send(Frame::text(message.clone())).await.unwrap();
        assert_eq!(next_text(ws).await, message);
        payload += 2 * message.len() as u64;
    }
    payload
}

#[tokio::test]
async fn a_client_that_offers_gets_deflate_and_the_backend_gets_plain_messages() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(&config("client", ""), &[&backend]).await;

    // What browsers offer, and what the relay answers.
    let offer = "permessage-deflate; client_max_window_bits";
    assert_eq!(
        answered_extensions(&relay, offer).await.as_deref(),
        Some(BOTH)
    );

    let (mut ws, wire) = yawc_client(&relay, client_options(Some(plain_offer()))).await;
    let count = 200;
    let payload = chat(&mut ws, count).await;
    let on_the_wire = wire.total();

    // The backend got every message whole and uncompressed, and no offer of its own.
    let texts = backend.texts();
    assert_eq!(texts.len(), count);
    assert_eq!(texts[7], chat_message(7));
    for seen in backend.connections() {
        assert_eq!(seen.header("sec-websocket-extensions"), None);
    }

    // The same exchange uncompressed, for the figures.
    let (mut plain, plain_wire) = yawc_client(&relay, client_options(None)).await;
    let plain_payload = chat(&mut plain, count).await;
    assert_eq!(plain_payload, payload);
    let uncompressed_wire = plain_wire.total();
    eprintln!(
        "chat JSON, {count} messages each way, {} bytes each on average: {payload} payload bytes; \
         on the wire {uncompressed_wire} bytes uncompressed, {on_the_wire} with permessage-deflate \
         ({:.2}x fewer)",
        payload / (2 * count as u64),
        uncompressed_wire as f64 / on_the_wire as f64
    );
    // Each message is compressed on its own (no context takeover): a short one gains little.
    assert!(
        on_the_wire * 10 < uncompressed_wire * 9,
        "compressed {on_the_wire} bytes vs {uncompressed_wire} uncompressed"
    );
    // A room's history in one message (20 chat messages as a JSON array) gains a lot.
    let history = format!(
        "[{}]",
        (0..20).map(chat_message).collect::<Vec<_>>().join(",")
    );
    let (before, plain_before) = (wire.total(), plain_wire.total());
    for _ in 0..20 {
        ws.send(Frame::text(history.clone())).await.unwrap();
        assert_eq!(next_text(&mut ws).await, history);
        plain.send(Frame::text(history.clone())).await.unwrap();
        assert_eq!(next_text(&mut plain).await, history);
    }
    let (history_wire, history_plain) = (wire.total() - before, plain_wire.total() - plain_before);
    eprintln!(
        "room history, 20 messages of {} bytes each way: on the wire {history_plain} bytes \
         uncompressed, {history_wire} with permessage-deflate ({:.2}x fewer)",
        history.len(),
        history_plain as f64 / history_wire as f64
    );
    assert!(
        history_wire * 4 < history_plain,
        "{history_wire} vs {history_plain}"
    );

    // The metrics count both sides of the compressed leg (its upgrade request and response
    // are not frames, so the wire count is below the client's).
    let message_in = relay
        .metric("wsrelay_compression_message_bytes_total{direction=\"in\"}")
        .await;
    assert_eq!(message_in, (payload / 2 + 20 * history.len() as u64) as f64);
    let wire_out = relay
        .metric("wsrelay_compression_wire_bytes_total{direction=\"out\"}")
        .await;
    let message_out = relay
        .metric("wsrelay_compression_message_bytes_total{direction=\"out\"}")
        .await;
    assert_eq!(message_out, message_in);
    assert!(
        wire_out > 0.0 && wire_out < message_out,
        "{wire_out} bytes on the wire for {message_out} of messages"
    );
    assert!(relay.metric("wsrelay_compression_sessions_total").await >= 1.0);
    ws.send(Frame::close(yawc::close::CloseCode::Normal, b"bye"))
        .await
        .unwrap();
}

#[tokio::test]
async fn off_declines_every_offer_and_clients_still_talk() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(&config("off", ""), &[&backend]).await;
    assert_eq!(
        answered_extensions(&relay, "permessage-deflate; client_max_window_bits").await,
        None
    );
    // A client that offered, told no, speaks uncompressed.
    let (mut ws, _) = yawc_client(&relay, client_options(Some(plain_offer()))).await;
    assert!(chat(&mut ws, 3).await > 0);
    assert_eq!(backend.texts().len(), 3);
    // The default is off too.
    let default = TestRelay::start(
        "[[route]]\npath = \"/\"\nupstream = \"main\"\n\n[upstream.main]\nbackends = BACKENDS\n",
        &[&backend],
    )
    .await;
    assert_eq!(
        answered_extensions(&default, "permessage-deflate").await,
        None
    );
}

#[tokio::test]
async fn the_offers_parameters_are_honoured() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(&config("client", ""), &[&backend]).await;
    // No offer, no extension.
    assert_eq!(answered_extensions(&relay, "").await, None);
    // A window limit for the relay is answered, and used.
    assert_eq!(
        answered_extensions(&relay, "permessage-deflate; server_max_window_bits=10")
            .await
            .as_deref(),
        Some(&*format!("{BOTH}; server_max_window_bits=10"))
    );
    // 8 bits is more than zlib can promise: that offer is declined, the next one taken.
    assert_eq!(
        answered_extensions(&relay, "permessage-deflate; server_max_window_bits=8").await,
        None
    );
    assert_eq!(
        answered_extensions(
            &relay,
            "permessage-deflate; server_max_window_bits=8, permessage-deflate; server_no_context_takeover"
        )
        .await
        .as_deref(),
        Some(BOTH)
    );
    // An invalid offer is declined.
    assert_eq!(
        answered_extensions(&relay, "permessage-deflate; server_max_window_bits=16").await,
        None
    );
    assert_eq!(
        answered_extensions(&relay, "permessage-deflate; no_such_thing").await,
        None
    );

    // A client holding the relay to a 9-bit window and asking for no context takeover gets
    // messages it can inflate with that window.
    let offer = DeflateOptions {
        server_max_window_bits: Some(9),
        client_max_window_bits: Some(9),
        server_no_context_takeover: true,
        client_no_context_takeover: true,
        ..plain_offer()
    };
    let (mut ws, _) = yawc_client(&relay, client_options(Some(offer))).await;
    // Larger than the window: a relay that compressed with 15 bits would refer past it.
    let long: String = (0..40).map(chat_message).collect::<Vec<_>>().join(",");
    ws.send(Frame::text(long.clone())).await.unwrap();
    assert_eq!(next_text(&mut ws).await, long);
}

#[tokio::test]
async fn a_decompression_bomb_gets_1009_and_nothing_else_is_disturbed() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(
        &config("client", "max_message_size = \"64KiB\""),
        &[&backend],
    )
    .await;
    let mut bystander = connect(&relay.url("/")).await;
    assert_eq!(round_trip(&mut bystander, "before").await, "before");
    let (mut compressed_bystander, _) =
        yawc_client(&relay, client_options(Some(plain_offer()))).await;
    assert!(chat(&mut compressed_bystander, 1).await > 0);

    // 64 MiB of zeros is about 64 KiB compressed: well inside the frame limit on the wire.
    let (mut bomber, wire) = yawc_client(&relay, client_options(Some(plain_offer()))).await;
    let before = wire.written();
    bomber
        .send(Frame::binary(vec![0u8; 64 << 20]))
        .await
        .unwrap();
    let sent = wire.written() - before;
    assert!(sent < 1 << 20, "the bomb took {sent} bytes on the wire");
    let close = loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), bomber.next_frame())
            .await
            .expect("a close in time")
            .expect("a close frame before the end");
        if frame.opcode() == OpCode::Close {
            break frame;
        }
    };
    assert_eq!(
        close.close_code().map(u16::from),
        Some(1009),
        "{:?}",
        close.close_reason()
    );

    // Nothing of the bomb reached the backend; the others go on.
    wait_until("the bomber's session to end", || {
        relay.handle.open_sessions() == 2
    })
    .await;
    assert_eq!(round_trip(&mut bystander, "after").await, "after");
    assert!(chat(&mut compressed_bystander, 2).await > 0);
    assert!(backend.messages().iter().all(|m| m.len() < 64 << 10));
}

#[tokio::test]
async fn a_message_at_the_limit_passes_and_one_past_it_gets_1009() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(
        &config("client", "max_message_size = \"64KiB\""),
        &[&backend],
    )
    .await;
    let (mut ws, _) = yawc_client(&relay, client_options(Some(plain_offer()))).await;
    let at_limit = "a".repeat(64 << 10);
    ws.send(Frame::text(at_limit.clone())).await.unwrap();
    assert_eq!(next_text(&mut ws).await.len(), at_limit.len());
    ws.send(Frame::text("a".repeat((64 << 10) + 1)))
        .await
        .unwrap();
    let close = loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next_frame())
            .await
            .unwrap()
            .unwrap();
        if frame.opcode() == OpCode::Close {
            break frame;
        }
    };
    assert_eq!(close.close_code().map(u16::from), Some(1009));
}

/// The Python interpreter with `websockets`: `WSRELAY_PYTHON`, or the workspace's `.venv`
/// (which `.ci/run` fills), or `python3`.
fn python_with_websockets() -> Option<String> {
    let root = wsrelay_testkit::workspace_root();
    let candidates = [
        std::env::var("WSRELAY_PYTHON").ok(),
        Some(root.join(".venv/bin/python").display().to_string()),
        Some("python3".to_owned()),
    ];
    candidates.into_iter().flatten().find(|python| {
        std::process::Command::new(python)
            .args(["-c", "import websockets"])
            .output()
            .is_ok_and(|out| out.status.success())
    })
}

const PYTHON_CLIENT: &str = r#"
import asyncio, json, sys
from websockets.asyncio.client import connect

async def main(url):
    async with connect(url) as ws:
        print("extensions", ws.response.headers.get("Sec-WebSocket-Extensions"), flush=True)
        for i in range(20):
            message = json.dumps({"type": "message", "room": "general", "id": i, "text": "hello from python " * 4})
            await ws.send(message)
            echo = await ws.recv()
            assert echo == message, (echo, message)
        print("echoed 20", flush=True)

asyncio.run(main(sys.argv[1]))
"#;

#[tokio::test]
async fn pythons_websockets_negotiates_deflate_through_the_relay() {
    let Some(python) = python_with_websockets() else {
        eprintln!(
            "SKIPPED: no Python with the websockets package (pip install websockets, or set WSRELAY_PYTHON)"
        );
        return;
    };
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(&config("client", ""), &[&backend]).await;
    let url = relay.url("/");
    // Blocking, on its own thread: the relay runs on this test's runtime meanwhile.
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&python)
            .args(["-c", PYTHON_CLIENT, &url])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // websockets offers `permessage-deflate; client_max_window_bits`, as browsers do.
    assert!(stdout.contains(&format!("extensions {BOTH}")), "{stdout}");
    assert!(stdout.contains("echoed 20"), "{stdout}");
    assert_eq!(backend.texts().len(), 20);
    assert!(backend.texts()[0].starts_with("{\"type\": \"message\""));
}

/// Idle clients held by a relay process, compressed or not: the relay's resident memory per
/// client. Each client exchanges one chat message first, so a compressed one has used deflate
/// state; with no context takeover it goes back to the process's pool, and the idle client
/// holds none.
#[tokio::test]
async fn an_idle_compressed_client_costs_about_what_a_plain_one_does() {
    const CLIENTS: u64 = 300;
    let backend = TestBackend::start("b").await;
    let dir = wsrelay_testkit::TempDir::new();
    let listen = wsrelay_testkit::unused_addr();
    let config = format!(
        r#"
[server]
listen = "{listen}"

[[route]]
path = "/plain"
upstream = "main"

[[route]]
path = "/deflate"
upstream = "main"
compression = "client"

[upstream.main]
backends = ["{}"]
"#,
        backend.url()
    );
    let path = dir.write("memory.toml", &config);
    let mut relay =
        wsrelay_testkit::RelayProcess::spawn(&["--config", path.to_str().unwrap()], "warn");
    relay.wait_listening(listen).await;
    let pid = relay.pid();

    // Warm both paths once, so the pool and the allocator's arenas exist before measuring.
    let mut warm = connect(&format!("ws://{listen}/plain")).await;
    assert_eq!(round_trip(&mut warm, "warm").await, "warm");
    let deflate_url = url::Url::parse(&format!("ws://{listen}/deflate")).unwrap();
    let open_compressed = || async {
        let tcp = TcpStream::connect(listen).await.unwrap();
        let mut ws = WebSocket::handshake(
            deflate_url.clone(),
            tcp,
            client_options(Some(plain_offer())),
        )
        .await
        .unwrap();
        let message = chat_message(1);
        ws.send(Frame::text(message.clone())).await.unwrap();
        assert_eq!(next_text(&mut ws).await, message);
        ws
    };
    let _warm_compressed = open_compressed().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let before_plain = wsrelay_testkit::resident_bytes(Some(pid));
    let mut plain = Vec::new();
    for _ in 0..CLIENTS {
        let mut client = connect(&format!("ws://{listen}/plain")).await;
        let message = chat_message(1);
        assert_eq!(round_trip(&mut client, &message).await, message);
        plain.push(client);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after_plain = wsrelay_testkit::resident_bytes(Some(pid));

    let mut compressed = Vec::new();
    for _ in 0..CLIENTS {
        compressed.push(open_compressed().await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after_compressed = wsrelay_testkit::resident_bytes(Some(pid));

    let per_plain = after_plain.saturating_sub(before_plain) / CLIENTS;
    let per_compressed = after_compressed.saturating_sub(after_plain) / CLIENTS;
    println!(
        "{CLIENTS} idle clients each: relay RSS {} KiB per plain client, {} KiB per compressed client",
        per_plain >> 10,
        per_compressed >> 10
    );
    // Deflate state kept per connection would be hundreds of KiB (a 32 KiB window each way
    // plus zlib's tables); pooled, the difference is yawc's buffers.
    assert!(
        per_compressed < per_plain + (32 << 10),
        "{} KiB per compressed client vs {} KiB per plain one",
        per_compressed >> 10,
        per_plain >> 10
    );

    // CPU per message: the relay's user+system time for the same chat messages through one
    // plain and one compressed client (this is whatever build the test runs: debug by default).
    const MESSAGES: usize = 2000;
    let mut plain_client = plain.pop().unwrap();
    let before = cpu_seconds(pid);
    for i in 0..MESSAGES {
        let message = chat_message(i);
        assert_eq!(round_trip(&mut plain_client, &message).await, message);
    }
    let plain_cpu = cpu_seconds(pid) - before;
    let mut compressed_client = compressed.pop().unwrap();
    let before = cpu_seconds(pid);
    chat(&mut compressed_client, MESSAGES).await;
    let compressed_cpu = cpu_seconds(pid) - before;
    println!(
        "relay CPU per chat message round trip: {:.1} µs plain, {:.1} µs compressed",
        plain_cpu * 1e6 / MESSAGES as f64,
        compressed_cpu * 1e6 / MESSAGES as f64
    );
    drop((plain, compressed));
    relay.signal("TERM");
    let _ = relay.wait_exit().await;
}

/// User plus system CPU time of process `pid` so far, from `/proc/PID/stat` (0 elsewhere).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces: count from the closing parenthesis.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15, in clock ticks (100 a second on Linux).
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

#[tokio::test]
async fn a_websocket_over_http2_negotiates_deflate_as_well() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(
        &config("client", "").replace("[server]", "[server]\nhttp2 = true"),
        &[&backend],
    )
    .await;
    let mut h2 = wsrelay_testkit::H2Connection::connect(relay.addr())
        .await
        .unwrap();
    let offer = [(
        "sec-websocket-extensions",
        "permessage-deflate; client_max_window_bits",
    )];
    let stream = h2.websocket_stream("/", &offer).await.unwrap();
    // The client side with what the relay answers over HTTP/1.1: if the relay had not
    // negotiated, its leg would fail the first compressed frame with 1002.
    let mut ws = WebSocket::from_stream_with_extensions(
        stream,
        yawc::Role::Client,
        Some(BOTH),
        client_options(Some(plain_offer())),
    )
    .unwrap();
    let history = format!(
        "[{}]",
        (0..20).map(chat_message).collect::<Vec<_>>().join(",")
    );
    ws.send(Frame::text(history.clone())).await.unwrap();
    assert_eq!(next_text(&mut ws).await, history);
    assert_eq!(backend.texts(), [history]);
}
