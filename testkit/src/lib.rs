//! Test support shared by wsrelay's test suites (`tests/`, `client-sdk/tests`,
//! `loadtest/tests`): one configurable WebSocket backend ([`TestBackend`]), a relay started in
//! this process from a TOML snippet ([`TestRelay`]), WebSocket clients ([`connect`] and
//! friends), raw sockets and hand-made frames ([`RawClient`], [`raw_exchange`]), a TCP
//! forwarder whose connections can be cut like a crash ([`KillableProxy`]), a self-signed
//! certificate ([`TestCertificate`]), a DNS server whose records a test changes ([`TestDns`]),
//! a backend that accepts TCP and never answers ([`HungBackend`]), a stream that counts its
//! bytes on the wire ([`CountedStream`]),
//! an HTTP/2 client opening WebSockets by extended CONNECT ([`H2Connection`]), a way to run a
//! server apart from the test's own tasks
//! ([`spawn_isolated`]), and bounded waits ([`wait_until`], [`within`], [`retry`]).
//!
//! Everything listens on 127.0.0.1, port 0 unless a test asks for a port. No wait asserts on
//! elapsed time: each is bounded by [`WAIT`] and fails the test with what it waited for.
//!
//! This crate does not depend on `wsrelay-client`: the SDK's own tests use it, and a
//! dependency back would build a second copy of the SDK whose types would not match.

// tungstenite's handshake callback fixes its (large) error type.
#![allow(clippy::result_large_err)]
#![warn(missing_docs)]

mod backend;
mod binary;
mod client;
mod dns;
mod files;
mod h2;
mod hung;
mod isolated;
mod process;
mod proxy;
mod raw;
mod relay;
mod wait;
mod wire;

pub use backend::{BackendBehavior, BackendLog, SeenConnection, StoppedBackend, TestBackend};
pub use binary::{echo_backend_binary, workspace_root, wsrelay_binary};
pub use client::{
    Client, connect, connect_as, connect_request, expect_close, next_data, refused_status,
    request_as, round_trip, user_ranked_first, users_ranked_first,
};
pub use dns::{TestDns, backends_on_one_port, has_ipv6_loopback, listeners_on_one_port};
pub use files::{IssuedCertificate, TempDir, TestCa, TestCertificate};
pub use h2::{H2Answer, H2Connection, H2WebSocket};
pub use hung::HungBackend;
pub use isolated::{Isolated, spawn_isolated};
pub use process::{RelayProcess, resident_bytes};
pub use proxy::KillableProxy;
pub use raw::{
    RawClient, find_close_code, raw_exchange, read_until_quiet, status_of, unused_addr,
    upgrade_request,
};
pub use relay::{SIMPLE, TestRelay, backend_list, init_logs, simple_hashed};
pub use wait::{WAIT, retry, wait_until, within};
pub use wire::{CountedStream, WireCount, chat_message};
