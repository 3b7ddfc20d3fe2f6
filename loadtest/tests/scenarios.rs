//! Every scenario in a tiny configuration against an in-process backend (and `echo` and
//! `churn` through an in-process relay too), asserting counts, never timings: what was sent
//! came back, nothing failed.

use std::net::SocketAddr;
use std::time::Duration;

use wsrelay_loadtest::backend::{BackendKind, BackendServer};
use wsrelay_loadtest::monitor::Watched;
use wsrelay_loadtest::procstat::ProcessGroup;
use wsrelay_loadtest::run::{self, ScenarioOpts};
use wsrelay_loadtest::scenario::churn::ChurnOpts;
use wsrelay_loadtest::scenario::echo::EchoOpts;
use wsrelay_loadtest::scenario::fanout::FanoutOpts;
use wsrelay_loadtest::scenario::hold::HoldOpts;
use wsrelay_loadtest::scenario::rate::{self, RateOpts};
use wsrelay_loadtest::scenario::{self, CommonOpts, Measurement, RunTarget};
use wsrelay_loadtest::worker::WorkerLauncher;
use wsrelay_testkit::TestRelay;

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn target(common: &CommonOpts, url: &str) -> RunTarget {
    RunTarget {
        label: "test".into(),
        connector: run::connector(common, &[url.to_owned()]).await.unwrap(),
        watched: Watched {
            // Our own process stands in for a proxy, so the memory and CPU paths run.
            proxy: ProcessGroup::new(vec![std::process::id()]),
            backend: ProcessGroup::default(),
        },
        show_progress: false,
    }
}

fn assert_clean(m: &Measurement) {
    assert!(m.errors.is_empty(), "errors: {:?}", m.errors);
}

async fn relay_in_front_of(backend: &BackendServer) -> TestRelay {
    TestRelay::quick(any_port(), &backend.url()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_direct_counts_match() {
    let backend = BackendServer::start(BackendKind::Echo, any_port())
        .await
        .unwrap();
    let common = CommonOpts::tiny();
    let m = scenario::echo::run(
        &common,
        &EchoOpts { window: 4 },
        &target(&common, &backend.url()).await,
    )
    .await;
    assert_clean(&m);
    assert_eq!(m.connections, 4);
    assert!(m.sent > 0);
    assert_eq!(m.sent, m.received);
    assert!(m.messages > 0 && m.messages <= m.received);
    assert_eq!(m.latency.len(), m.messages);
    assert!(m.memory.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_text_through_the_relay_counts_match() {
    let backend = BackendServer::start(BackendKind::Echo, any_port())
        .await
        .unwrap();
    let relay = relay_in_front_of(&backend).await;
    let mut common = CommonOpts::tiny();
    common.text = true;
    let url = relay.url("/");
    let m = scenario::echo::run(
        &common,
        &EchoOpts { window: 2 },
        &target(&common, &url).await,
    )
    .await;
    assert_clean(&m);
    assert_eq!(m.connections, 4);
    assert!(m.sent > 0);
    assert_eq!(m.sent, m.received);
    relay.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_sends_the_schedule_and_gets_it_back() {
    let backend = BackendServer::start(BackendKind::Echo, any_port())
        .await
        .unwrap();
    let common = CommonOpts::tiny();
    let opts = RateOpts {
        rate: 400.0,
        sweep: None,
        slo: rate::parse_slo("p99=1s").unwrap(),
        sweep_continue: false,
    };
    let m = scenario::rate::run(&common, &opts, &target(&common, &backend.url()).await).await;
    assert_clean(&m);
    // 400/s over 200 ms plus the 20 ms start delay: the pacer's count is what was sent.
    let scheduled = m.details["scheduled"].as_u64().unwrap();
    assert!(scheduled >= 70, "scheduled {scheduled}");
    assert_eq!(m.sent, scheduled);
    assert_eq!(m.received, scheduled);
    assert!(m.extra_latency["uncorrected"].len() == m.messages);
    assert!(m.extra_latency["send_lag"].len() == m.messages);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_sweep_reports_every_step() {
    let backend = BackendServer::start(BackendKind::Echo, any_port())
        .await
        .unwrap();
    let common = CommonOpts::tiny();
    let opts = RateOpts {
        rate: 0.0,
        sweep: Some(rate::parse_sweep("100,200").unwrap()),
        slo: rate::parse_slo("p99=2s").unwrap(),
        sweep_continue: false,
    };
    let m = scenario::rate::run(&common, &opts, &target(&common, &backend.url()).await).await;
    assert_clean(&m);
    let steps = m.details["sweep"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    // Each step's errors are counted; whether a step passes depends on timing, not asserted.
    for step in steps {
        assert_eq!(step["errors"], 0);
    }
    assert_eq!(m.sent, m.received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers_every_say_to_every_member() {
    let backend = BackendServer::start(BackendKind::Chat, any_port())
        .await
        .unwrap();
    let mut common = CommonOpts::tiny();
    common.connections = 10; // rooms of 4, 4 and 2
    let opts = FanoutOpts {
        room_size: 4,
        rate: 200.0,
    };
    let m = scenario::fanout::run(&common, &opts, &target(&common, &backend.url()).await).await;
    assert_clean(&m);
    assert_eq!(m.connections, 10);
    assert_eq!(m.details["rooms"], 3);
    let says = m.details["says_sent"].as_u64().unwrap();
    assert!(says > 0);
    assert_eq!(m.sent, says);
    assert_eq!(
        m.received,
        m.details["deliveries_expected"].as_u64().unwrap()
    );
    assert!(m.received >= says * 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_through_the_relay() {
    let backend = BackendServer::start(BackendKind::Chat, any_port())
        .await
        .unwrap();
    let relay = relay_in_front_of(&backend).await;
    let mut common = CommonOpts::tiny();
    common.connections = 6;
    let url = relay.url("/");
    let opts = FanoutOpts {
        room_size: 3,
        rate: 100.0,
    };
    let m = scenario::fanout::run(&common, &opts, &target(&common, &url).await).await;
    assert_clean(&m);
    assert_eq!(
        m.received,
        m.details["deliveries_expected"].as_u64().unwrap()
    );
    assert_eq!(m.received, m.sent * 3);
    relay.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_keeps_connections_and_counts_pongs() {
    let backend = BackendServer::start(BackendKind::Echo, any_port())
        .await
        .unwrap();
    let relay = relay_in_front_of(&backend).await;
    let mut common = CommonOpts::tiny();
    common.connections = 20;
    common.duration = Duration::from_millis(400);
    let opts = HoldOpts {
        ping_interval: Duration::from_millis(100),
        settle: Duration::from_millis(50),
        ..HoldOpts::default()
    };
    let url = relay.url("/");
    let m = scenario::hold::run(&common, &opts, &target(&common, &url).await, None)
        .await
        .unwrap();
    assert_clean(&m);
    assert_eq!(m.connections, 20);
    assert_eq!(m.details["dropped_while_held"], 0);
    let pings = m.details["pings_sent"].as_u64().unwrap();
    let pongs = m.details["pongs_received"].as_u64().unwrap();
    assert!(pings > 0);
    // At most one ping per connection is still in flight when the hold ends.
    assert!(
        pongs <= pings && pongs + 20 >= pings,
        "{pings} pings, {pongs} pongs"
    );
    let memory = m.memory.unwrap();
    assert_eq!(memory.connections, 20);
    relay.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_spreads_over_worker_processes_and_source_addresses() {
    let backend = BackendServer::start(BackendKind::Echo, any_port())
        .await
        .unwrap();
    let mut common = CommonOpts::tiny();
    common.connections = 30;
    common.source_addrs = 3;
    common.duration = Duration::from_millis(300);
    let opts = HoldOpts {
        ping_interval: Duration::ZERO,
        per_process: 12,
        settle: Duration::from_millis(50),
        ..HoldOpts::default()
    };
    let launcher = WorkerLauncher {
        exe: env!("CARGO_BIN_EXE_wsrelay-loadtest").into(),
    };
    let m = scenario::hold::run(
        &common,
        &opts,
        &target(&common, &backend.url()).await,
        Some(&launcher),
    )
    .await
    .unwrap();
    assert_clean(&m);
    assert_eq!(m.details["processes"], 3);
    assert_eq!(m.connections, 30);
    assert_eq!(m.latency.len(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_cycles_through_the_relay() {
    let backend = BackendServer::start(BackendKind::Echo, any_port())
        .await
        .unwrap();
    let relay = relay_in_front_of(&backend).await;
    let mut common = CommonOpts::tiny();
    common.connections = 2;
    let opts = ChurnOpts {
        settle: Duration::from_millis(50),
        max_cycles: 1000,
    };
    let url = relay.url("/");
    let m = scenario::churn::run(&common, &opts, &target(&common, &url).await).await;
    assert_clean(&m);
    assert!(m.received > 0);
    assert_eq!(m.sent, m.received);
    assert_eq!(
        m.details["cycles_completed"].as_u64(),
        m.details["cycles_attempted"].as_u64()
    );
    relay.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_run_json_has_the_contract_shape() {
    let backend = BackendServer::start(BackendKind::Echo, any_port())
        .await
        .unwrap();
    let common = CommonOpts::tiny();
    let report = run::run_single(
        &common,
        &ScenarioOpts::Echo(EchoOpts { window: 1 }),
        &[backend.url()],
        2,
        None,
    )
    .await
    .unwrap();
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["scenario"], "echo");
    assert_eq!(json["config"]["connections"], 4);
    assert_eq!(json["config"]["window"], 1);
    let t = &json["targets"][0];
    assert_eq!(t["name"], backend.url());
    assert_eq!(t["errors"], 0);
    assert!(t["messages"].as_u64().unwrap() > 0);
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(t["latency_us"][key].is_number(), "latency_us.{key}");
    }
    assert!(t["throughput_msgs_per_s"].is_number());
    assert!(t["ratio_to_direct"].is_null());
    assert!(t["ratio_to_nginx"].is_null());
    let text = wsrelay_loadtest::report::table::render(&report);
    assert!(text.starts_with("OK: no errors"), "{text}");
}
