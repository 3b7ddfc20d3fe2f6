//! `scale` at a small size: recording backends and relay processes (the relay library run as
//! processes by the harness) sharing one port with `reuse_port`, 600 clients in two
//! load-generator processes over three source addresses, keys shared by ten clients each. The
//! run must pass, and its counts must show that what it claims to check happened: every
//! relay took clients, keys came through several relays, and the backends saw every client.
//! That the check can fail is shown beside it (`scenario/scale/routing.rs`, a key on two
//! backends). Nothing is timed.

use wsrelay_loadtest::scenario::scale::{self, ScaleOpts, report};
use wsrelay_loadtest::targets;

fn programs() -> targets::Programs {
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_wsrelay-loadtest"));
    targets::programs(exe, None, true).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_sharing_a_port_send_every_key_to_one_backend() {
    let opts = ScaleOpts::tiny();
    let report = scale::run(&opts, &programs()).await.unwrap();
    let text = report::render(&report);
    assert!(report.passed(), "{text}");
    assert_eq!(report.status, "pass");

    let c = &report.clients;
    assert_eq!((c.asked, c.connected), (600, 600), "{text}");
    assert_eq!((c.failed, c.dropped, c.pong_timeouts), (0, 0, 0), "{text}");
    assert_eq!(c.processes, 2, "{text}");
    assert!(c.pings > 0, "{text}");
    assert!(c.closing.released_after_s.is_some(), "{text}");

    // The backends saw every client once, with its key, through a relay of the run.
    let r = &report.routing;
    assert_eq!(r.streams, 600, "{text}");
    assert_eq!(r.keys, 60, "{text}");
    assert_eq!(r.keys_on_several_backends, 0, "{text}");
    assert_eq!(
        (r.streams_without_key, r.unattributed_streams),
        (0, 0),
        "{text}"
    );
    assert!(r.keys_through_several_relays > 0, "{text}");
    assert_eq!(r.streams_per_relay.iter().sum::<u64>(), 600, "{text}");
    assert_eq!(report.backends.len(), 2);
    for b in &report.backends {
        // Three relays, two links each to every backend.
        assert!(b.links <= 6, "{text}");
    }

    // Every relay took clients and was measured.
    assert_eq!(report.relays.len(), 3);
    for relay in &report.relays {
        assert!(relay.clients > 0, "{text}");
        assert!(
            relay.rss_held_kib > 0 && relay.files_held > relay.clients,
            "{text}"
        );
    }
    assert!(report.relay_config.contains("reuse_port = true"));
    assert!(report.relay_config.contains("hash_key = \"query:key\""));

    let json = serde_json::to_value(&report).unwrap();
    for key in [
        "scenario", "status", "broken", "config", "clients", "relays", "totals", "routing",
        "backends", "hold",
    ] {
        assert!(json.get(key).is_some(), "{key} missing from the JSON");
    }
    assert_eq!(json["routing"]["keys_on_several_backends"], 0);
    assert_eq!(json["hold"]["connections"], 600);
}

#[tokio::test]
async fn options_that_cannot_fit_are_refused_with_a_reason() {
    let cases = [
        (
            ScaleOpts {
                connections: 100_000,
                relays: 2,
                ..ScaleOpts::tiny()
            },
            "add --relays",
        ),
        (
            ScaleOpts {
                key_space: 0,
                ..ScaleOpts::tiny()
            },
            "at least 1",
        ),
    ];
    for (opts, words) in cases {
        let error = scale::run(&opts, &programs())
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains(words), "{error}");
    }
}
