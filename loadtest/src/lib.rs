//! wsrelay-loadtest: the load-test harness of wsrelay, and a library so tests can run its
//! scenarios in-process.
//!
//! The binary (`src/main.rs`) is a thin CLI over this crate:
//!
//! ```text
//! wsrelay-loadtest echo    --target ws://127.0.0.1:8080/ -c 50 --size 64 --window 1 -d 10s
//! wsrelay-loadtest rate    --target URL --rate 20000            (or --sweep 1000..64000x2 --slo p99=5ms)
//! wsrelay-loadtest fanout  --target URL -c 1000 --room-size 10 --rate 500
//! wsrelay-loadtest hold    --target URL -c 100000 -d 60s --watch-pid $(pidof wsrelay)
//! wsrelay-loadtest churn   --target URL -c 16 -d 30s --watch-pid PID
//! wsrelay-loadtest soak    -c 10000 -d 30m                       (starts its own relay and backends)
//! wsrelay-loadtest scale   -c 100000 -d 10m --relays 6            (relays sharing a port, routing checked)
//! wsrelay-loadtest compare --scenario echo -c 50 --size 64 -d 10s --json out.json --html out.html
//! ```
//!
//! A reader finds each concept by its file: [`scenario`] (what load, what is measured; the
//! per-connection loop in `scenario/driver.rs`), [`pacer`] (the open-loop schedule), [`conn`]
//! (connecting, source addresses), [`stats`] (histograms, errors), [`monitor`] (sampling,
//! progress), [`procstat`] (`/proc`), [`sockets`] (which process holds which TCP socket),
//! [`backend`] (echo and chat servers), [`targets`] (starting and stopping relay, peer proxies
//! and backends), [`compare`], [`worker`] (hold worker processes), [`report`] (table, JSON,
//! HTML/SVG).

pub mod backend;
pub mod compare;
pub mod conn;
pub mod monitor;
pub mod pacer;
pub mod payload;
pub mod procstat;
pub mod report;
pub mod run;
pub mod scenario;
pub mod sockets;
pub mod stats;
pub mod targets;
pub mod units;
pub mod worker;
