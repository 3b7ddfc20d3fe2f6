//! Fuzzes the backend side of the relay: arbitrary bytes a backend might answer the relay's
//! WebSocket handshake with go through the real handshake code (hyper's HTTP/1.1 client, the
//! `101` checks, a refusal's body, the first frames after an upgrade) over an in-memory
//! stream. Never a panic; an accepted answer picked nothing or one of the offered subprotocols.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let outcome = runtime().block_on(wsrelay::fuzzing::backend_answer(data));
    match outcome {
        Ok(None) => {}
        Ok(Some(protocol)) => assert!(
            protocol == "chat" || protocol == "superchat",
            "accepted subprotocol {protocol:?}, which was not offered"
        ),
        Err(why) => assert!(!why.is_empty()),
    }
});
