//! `soak` at a small size: real backend processes (the harness's `serve echo|mux-echo`), the
//! relay library run as a process by the harness, 40 clients with churn, and backends killed
//! with SIGKILL and restarted while messages flow. The invariants must hold, and the counts
//! show that each thing the soak claims to exercise did happen. Nothing is timed.

use wsrelay_loadtest::scenario::soak::{self, SoakOpts};
use wsrelay_loadtest::targets;

fn programs() -> targets::Programs {
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_wsrelay-loadtest"));
    targets::programs(exe, None, true).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_soak_with_churn_and_backend_kills_keeps_every_invariant() {
    let opts = SoakOpts::tiny();
    let report = soak::run(&opts, &programs()).await.unwrap();
    let text = soak::render(&report);
    assert!(report.passed(), "{text}");
    assert_eq!(report.status, "pass");

    // Every client connected, the churn happened, and per-client backends died.
    let k = &report.connections;
    assert_eq!(k.clients_seen, 40, "{text}");
    assert_eq!(k.per_client + k.mux, 40);
    assert!(k.mux > 0 && k.per_client > 0);
    assert!(k.left > 0, "no client left and came back: {text}");
    assert!(report.faults.kills() > 0, "no backend was killed: {text}");
    assert_eq!(report.faults.mux_kills, 0, "{text}");
    assert_eq!(report.faults.restarts, report.faults.kills(), "{text}");

    // Every message sent was answered in order (duplicates are allowed after the kills).
    let c = &report.counts;
    assert!(c.sent > 0);
    assert_eq!(c.echoed, c.sent, "{text}");
    assert_eq!((c.lost, c.out_of_order, c.corrupt), (0, 0, 0), "{text}");
    assert_eq!(c.unexpected_closes, 0, "{text}");

    // The relay was measured, and was back near its baseline.
    let u = &report.relay_usage;
    assert!(u.baseline.rss_kib > 0 && u.baseline.fds > 0, "{text}");
    assert!(u.peak.fds > u.baseline.fds, "{text}");
    assert!(
        u.after.fds <= u.baseline.fds + report.tolerance.fds,
        "{text}"
    );

    let json = serde_json::to_value(&report).unwrap();
    for key in [
        "status",
        "broken",
        "counts",
        "connections",
        "faults",
        "relay_usage",
    ] {
        assert!(json.get(key).is_some(), "{key} missing from {json}");
    }
    assert_eq!(json["counts"]["lost"], 0);
}

#[tokio::test]
async fn options_that_cannot_soak_are_refused_with_a_reason() {
    let cases = [
        (
            SoakOpts {
                per_client_backends: 1,
                ..SoakOpts::tiny()
            },
            "at least 2 backends",
        ),
        (
            SoakOpts {
                size: 8,
                ..SoakOpts::tiny()
            },
            "16-byte header",
        ),
        (
            SoakOpts {
                ramp: std::time::Duration::from_secs(60),
                ..SoakOpts::tiny()
            },
            "shorter than --duration",
        ),
    ];
    for (opts, words) in cases {
        let error = soak::run(&opts, &programs()).await.unwrap_err().to_string();
        assert!(error.contains(words), "{error}");
    }
}
