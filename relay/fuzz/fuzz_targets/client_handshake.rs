//! Fuzzes the client side of the relay: arbitrary bytes a client might send are served by the
//! relay's real accept path (hyper's HTTP/1.1 server, admission, the upgrade checks, routing,
//! origins) over an in-memory stream. The relay must never panic, and whatever it writes back
//! is HTTP responses (HTTP/1.0 to an HTTP/1.0 request); no backend is reachable, so nothing is
//! ever switched to WebSocket.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;
use wsrelay::RelayHandle;
use wsrelay::config::Config;

/// One route to a backend nobody listens on (port 1: refused at once), an origin list, a
/// static `/healthz`: every kind of answer short of a session.
const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
handshake_timeout = "2s"

[limits]
allowed_origins = ["https://app.example"]

[[route]]
path = "/chat"
upstream = "nowhere"
hash_key = "query:user"

[upstream.nowhere]
backends = ["ws://127.0.0.1:1"]
connect_timeout = "1s"
"#;

fn relay() -> &'static (Runtime, RelayHandle) {
    static RELAY: OnceLock<(Runtime, RelayHandle)> = OnceLock::new();
    RELAY.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let config = Config::from_toml(CONFIG, "fuzz").expect("the fuzz config is valid");
        let handle = runtime
            .block_on(wsrelay::Relay::bind(config))
            .expect("the relay binds 127.0.0.1:0");
        (runtime, handle)
    })
}

fuzz_target!(|data: &[u8]| {
    let (runtime, handle) = relay();
    let answer = runtime.block_on(wsrelay::fuzzing::client_connection(handle, data));
    if answer.is_empty() {
        return;
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 ") || answer.starts_with(b"HTTP/1.0 "),
        "not an HTTP answer: {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)])
    );
    let status = std::str::from_utf8(&answer[9..answer.len().min(12)]).unwrap_or("");
    assert!(
        status.len() == 3 && status.bytes().all(|b| b.is_ascii_digit()) && status != "101",
        "status {status:?}"
    );
});
