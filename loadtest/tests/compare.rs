//! `compare` in a tiny configuration: real child processes (backends, the relay library
//! compiled into the harness, nginx, HAProxy and Caddy when installed) on 127.0.0.1, and the JSON it reports has
//! the contract's shape. Counts are asserted, timings never.

use std::time::Duration;

use wsrelay_loadtest::compare::{self, CompareOpts, HarnessExe, ScenarioKind, TargetKind};
use wsrelay_loadtest::scenario::CommonOpts;
use wsrelay_loadtest::targets::Peer;

fn exe() -> HarnessExe {
    HarnessExe(env!("CARGO_BIN_EXE_wsrelay-loadtest").into())
}

/// `targets` and each installed peer proxy after them, with the names of those installed; an
/// absent one is skipped, loudly.
fn with_peers_if_installed(mut targets: Vec<TargetKind>) -> (Vec<TargetKind>, Vec<&'static str>) {
    let mut installed = Vec::new();
    for peer in Peer::ALL {
        if peer.find(None).is_some() {
            targets.push(peer.into());
            installed.push(peer.name());
        } else {
            eprintln!("SKIPPED in this test: {}", peer.missing());
        }
    }
    (targets, installed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_echo_json_has_the_contract_shape() {
    let common = CommonOpts::tiny();
    let mut opts = CompareOpts::tiny(ScenarioKind::Echo);
    let (targets, peers) = with_peers_if_installed(vec![
        TargetKind::Direct,
        TargetKind::PerClient,
        TargetKind::Mux,
    ]);
    opts.targets = targets;
    let report = compare::run(&common, &opts, &exe(), 2).await.unwrap();
    let json = serde_json::to_value(&report).unwrap();

    assert_eq!(json["scenario"], "echo");
    assert_eq!(json["mode"], "compare");
    assert_eq!(json["config"]["connections"], 4);
    assert_eq!(json["config"]["rounds"], 1);
    let targets = json["targets"].as_array().unwrap();
    let names: Vec<&str> = targets
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    let mut expected = vec!["direct", "per-client", "mux"];
    expected.extend(&peers);
    assert_eq!(names, expected);
    let nginx = peers.contains(&"nginx");
    assert_eq!(json["best_peer"].is_null(), peers.is_empty());

    for t in targets {
        let name = t["name"].as_str().unwrap();
        for key in [
            "messages",
            "errors",
            "throughput_msgs_per_s",
            "latency_us",
            "proxy_cpu_s_per_million_msgs",
            "rss_kib_per_conn",
            "ratio_to_direct",
            "ratio_to_nginx",
            "ratio_to_best_peer",
        ] {
            assert!(t.get(key).is_some(), "{name}: no {key}");
        }
        let status = t["status"].as_str().unwrap();
        if name == "mux" && status != "ok" {
            // Until the relay implements mux mode (or the mux backend is built).
            assert!(status.starts_with("skipped: "), "{status}");
            assert!(t["throughput_msgs_per_s"].is_null());
            continue;
        }
        assert_eq!(status, "ok", "{name}");
        assert_eq!(t["errors"], 0, "{name}: {}", t["error_kinds"]);
        assert_eq!(t["sent"], t["received"], "{name}");
        assert!(t["messages"].as_u64().unwrap() > 0, "{name}");
        assert!(t["throughput_msgs_per_s"].as_f64().unwrap() > 0.0);
        for key in ["p50", "p90", "p99", "p999", "max"] {
            assert!(t["latency_us"][key].is_number(), "{name}: latency_us.{key}");
        }
        assert!(t["ratio_to_direct"]["throughput"].is_number(), "{name}");
        assert_eq!(t["ratio_to_nginx"].is_null(), !nginx, "{name}");
        assert_eq!(
            t["ratio_to_best_peer"].is_null(),
            peers.is_empty(),
            "{name}"
        );
        if name == "direct" {
            assert!(t["proxy_cpu_s_per_million_msgs"].is_null());
            assert!(t["rss_kib_per_conn"].is_null());
            assert_eq!(t["ratio_to_direct"]["throughput"], 1.0);
        } else {
            assert!(t["proxy_cpu_s_per_million_msgs"].is_number(), "{name}");
            assert!(t["rss_kib_per_conn"].is_number(), "{name}");
            // The "loaded" reading is taken with every connection open: at least the client
            // socket each (per-client and nginx also hold a backend socket each; mux shares
            // its backend links).
            let fds = |k: &str| t["memory"][k].as_u64().unwrap();
            assert!(
                fds("fds_loaded") >= fds("fds_before") + 4,
                "{name}: {}",
                t["memory"]
            );
        }
    }
    let text = wsrelay_loadtest::report::table::render(&report);
    assert!(text.starts_with("OK: no errors"), "{text}");
    let html = wsrelay_loadtest::report::html::render(&report);
    assert!(html.contains("<svg") && !html.contains("<script"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_hold_measures_the_relay_memory() {
    let mut common = CommonOpts::tiny();
    common.connections = 20;
    common.duration = Duration::from_millis(300);
    let mut opts = CompareOpts::tiny(ScenarioKind::Hold);
    opts.targets = vec![TargetKind::Direct, TargetKind::PerClient];
    let report = compare::run(&common, &opts, &exe(), 2).await.unwrap();
    assert_eq!(report.errors_total, 0, "{:?}", report.targets);
    let relay = &report.targets[1];
    assert_eq!(relay.name, "per-client");
    assert_eq!(relay.connections, 20);
    let memory = relay.memory.expect("the relay is watched");
    assert_eq!(memory.connections, 20);
    // Each client costs the relay two sockets (client and backend legs).
    assert!(memory.fds_loaded >= memory.fds_before + 40, "{memory:?}");
}

/// Fanout over two backends: each peer proxy (and the relay) must hash a room's members onto
/// one backend, or members miss says (`undelivered` errors). Direct is left out: it spreads
/// clients round-robin, rooms and all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_fanout_keeps_rooms_together_through_every_peer() {
    let mut common = CommonOpts::tiny();
    common.connections = 16;
    common.duration = Duration::from_millis(300);
    let mut opts = CompareOpts::tiny(ScenarioKind::Fanout);
    opts.backends = 2;
    opts.room_size = 4;
    let (targets, _) = with_peers_if_installed(vec![TargetKind::PerClient]);
    opts.targets = targets;
    let report = compare::run(&common, &opts, &exe(), 2).await.unwrap();
    for t in &report.targets {
        assert_eq!(t.status, "ok", "{}", t.name);
        assert_eq!(t.errors, 0, "{}: {:?}", t.name, t.error_kinds);
        assert!(t.messages > 0, "{}", t.name);
    }
}
