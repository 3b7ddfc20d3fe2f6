//! DNS discovery (docs/configuration.md, `discover`): a real DNS server on 127.0.0.1 whose
//! records the tests change between the relay's refreshes, and backends on several loopback
//! addresses sharing one port, as the pods behind a headless Service do. Added addresses join
//! the ranking without disturbing anyone; clients of removed ones move (or close 1012) after
//! `shutdown_grace`; a DNS server that fails keeps the last set.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use wsrelay_client::MuxClient;
use wsrelay_testkit::*;
use wsrelay_tests::MuxBackend;

const NAME: &str = "chat.test.";

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// One route `/chat` hashed on `X-User` over the upstream `main`, discovered from
/// `chat.test:PORT` through `dns` every 100 ms.
fn config(dns: &TestDns, port: u16, extra_upstream: &str) -> String {
    format!(
        r#"
[server]
admin = "127.0.0.1:0"
resolver = "{}"
shutdown_grace = "300ms"

[keepalive]
ping_interval = "0s"

[[route]]
path = "/chat"
upstream = "main"
hash_key = "header:X-User"

[upstream.main]
discover = {{ dns = "chat.test:{port}", refresh = "100ms" }}
connect_timeout = "2s"
{extra_upstream}
"#,
        dns.addr()
    )
}

/// The backend URLs `/api/backends` lists.
async fn listed(relay: &TestRelay) -> Vec<String> {
    let rows: serde_json::Value = serde_json::from_str(&relay.admin_get("/api/backends").await)
        .expect("/api/backends is JSON");
    rows.as_array()
        .unwrap()
        .iter()
        .map(|row| row["url"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until `/api/backends` lists exactly `urls` (in any order).
async fn wait_listed(relay: &TestRelay, urls: &[String]) {
    let mut wanted = urls.to_vec();
    wanted.sort();
    within(&format!("/api/backends to list {wanted:?}"), async {
        loop {
            let mut now = listed(relay).await;
            now.sort();
            if now == wanted {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// The value of the Prometheus sample `series` (the whole series, labels included).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

/// Three backends `a`, `b`, `c` on 127.0.0.2, .4 and .5, one port.
fn three_backends() -> (BTreeMap<String, TestBackend>, u16) {
    let backends = backends_on_one_port(&[
        ("a", ip("127.0.0.2")),
        ("b", ip("127.0.0.4")),
        ("c", ip("127.0.0.5")),
    ]);
    let port = backends["a"].addr.port();
    (backends, port)
}

fn addresses(backends: &BTreeMap<String, TestBackend>, names: &[&str]) -> Vec<IpAddr> {
    names.iter().map(|name| backends[*name].addr.ip()).collect()
}

fn urls(backends: &BTreeMap<String, TestBackend>, names: &[&str]) -> Vec<String> {
    names.iter().map(|name| backends[*name].url()).collect()
}

/// Backend-side connections of `user` so far on `backend`.
fn connections_of(backend: &TestBackend, user: &str) -> usize {
    backend
        .connections()
        .iter()
        .filter(|seen| seen.header("x-user").as_deref() == Some(user))
        .count()
}

/// Asks `client` which backend serves it until the answer is not `old`; returns the new one.
async fn moved_from(client: &mut Client, old: &str) -> String {
    within(&format!("the client to leave {old}"), async {
        loop {
            let now = round_trip(client, "whoami").await;
            if now != old {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test]
async fn added_addresses_join_and_removed_ones_move_their_clients() {
    let (backends, port) = three_backends();
    let dns = TestDns::start("test.").await;
    dns.set(NAME, &addresses(&backends, &["a", "b"])).await;
    let relay = TestRelay::start(&config(&dns, port, ""), &[]).await;
    let url = relay.url("/chat/room");

    // Resolved before the first client: this one is routed at once.
    let two = urls(&backends, &["a", "b"]);
    let on_a = users_ranked_first(&two, 0, 2);
    let on_b = users_ranked_first(&two, 1, 2);
    let mut clients = Vec::new();
    for (user, name) in on_a
        .iter()
        .map(|u| (u, "a"))
        .chain(on_b.iter().map(|u| (u, "b")))
    {
        let mut client = connect_as(&url, user).await;
        assert_eq!(round_trip(&mut client, "whoami").await, name, "{user}");
        clients.push((user.clone(), name, client));
    }
    assert_eq!(listed(&relay).await.len(), 2);

    // A third address joins the ranking; nobody already connected is disturbed.
    dns.set(NAME, &addresses(&backends, &["a", "b", "c"])).await;
    let three = urls(&backends, &["a", "b", "c"]);
    wait_listed(&relay, &three).await;
    for (user, name, client) in &mut clients {
        assert_eq!(round_trip(client, "whoami").await, *name, "{user} stayed");
        assert_eq!(
            connections_of(&backends[*name], user),
            1,
            "{user} was not reconnected"
        );
    }
    let newcomer = users_ranked_first(&three, 2, 10)
        .into_iter()
        .find(|user| !on_a.contains(user) && !on_b.contains(user))
        .expect("a user of its own for c");
    let mut on_c = connect_as(&url, &newcomer).await;
    assert_eq!(round_trip(&mut on_c, "whoami").await, "c");

    // `b` leaves: its clients keep their sockets and move to another backend after the grace;
    // the others stay where they are.
    dns.set(NAME, &addresses(&backends, &["a", "c"])).await;
    wait_listed(&relay, &urls(&backends, &["a", "c"])).await;
    for (user, name, client) in &mut clients {
        if *name == "b" {
            let now = moved_from(client, "b").await;
            assert!(now == "a" || now == "c", "{user} moved to {now}");
        } else {
            assert_eq!(round_trip(client, "whoami").await, "a", "{user}");
            assert_eq!(connections_of(&backends["a"], user), 1, "{user}");
        }
    }
    assert_eq!(round_trip(&mut on_c, "whoami").await, "c");
    assert_eq!(connections_of(&backends["c"], &newcomer), 1);
    wait_until("b's clients to leave it", || backends["b"].open() == 0).await;

    let metrics = relay.admin_get("/metrics").await;
    assert_eq!(
        sample(&metrics, "wsrelay_discovered_backends{upstream=\"main\"}"),
        Some(2.0),
        "{metrics}"
    );
    assert!(
        sample(&metrics, "wsrelay_reoriginations_total") >= Some(2.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn clients_of_a_removed_address_are_closed_1012_in_close_mode() {
    let (backends, port) = three_backends();
    let dns = TestDns::start("test.").await;
    dns.set(NAME, &addresses(&backends, &["a", "b"])).await;
    let relay = TestRelay::start(&config(&dns, port, "on_backend_loss = \"close\""), &[]).await;
    let url = relay.url("/chat/room");
    let two = urls(&backends, &["a", "b"]);
    let stays = user_ranked_first(&two, 0);
    let leaves = user_ranked_first(&two, 1);
    let mut staying = connect_as(&url, &stays).await;
    let mut leaving = connect_as(&url, &leaves).await;
    assert_eq!(round_trip(&mut staying, "whoami").await, "a");
    assert_eq!(round_trip(&mut leaving, "whoami").await, "b");

    dns.set(NAME, &addresses(&backends, &["a"])).await;
    let frame = expect_close(&mut leaving).await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1012);
    assert_eq!(round_trip(&mut staying, "whoami").await, "a");
    assert_eq!(connections_of(&backends["a"], &stays), 1);
    // A new client of the same key lands on what is left.
    let mut again = connect_as(&url, &leaves).await;
    assert_eq!(round_trip(&mut again, "whoami").await, "a");
}

#[tokio::test]
async fn a_failing_dns_server_keeps_the_last_set_and_is_counted() {
    let (backends, port) = three_backends();
    let dns = TestDns::start("test.").await;
    dns.set(NAME, &addresses(&backends, &["a", "b"])).await;
    let relay = TestRelay::start(&config(&dns, port, ""), &[]).await;
    let url = relay.url("/chat/room");
    let two = urls(&backends, &["a", "b"]);
    let mut before = connect_as(&url, "before").await;
    assert_eq!(round_trip(&mut before, "hi").await, "hi");

    let failures = |metrics: &str| {
        sample(
            metrics,
            "wsrelay_discovery_failures_total{upstream=\"main\"}",
        )
        .unwrap_or(0.0)
    };
    // No answer at all (lookups time out), then NXDOMAIN: each time the set stays.
    dns.set_silent(true);
    let mut counted = 0.0;
    within("failed lookups to be counted", async {
        loop {
            counted = failures(&relay.admin_get("/metrics").await);
            if counted >= 2.0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(listed(&relay).await.len(), 2);
    let mut during = connect_as(&url, "during").await;
    assert_eq!(round_trip(&mut during, "hi").await, "hi");
    assert_eq!(round_trip(&mut before, "still").await, "still");

    dns.set_silent(false);
    dns.set(NAME, &[]).await;
    within("NXDOMAIN answers to be counted", async {
        loop {
            if failures(&relay.admin_get("/metrics").await) >= counted + 2.0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let mut now = listed(&relay).await;
    now.sort();
    assert_eq!(now, two, "the last set stays");
    let metrics = relay.admin_get("/metrics").await;
    assert_eq!(
        sample(&metrics, "wsrelay_discovered_backends{upstream=\"main\"}"),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(round_trip(&mut during, "again").await, "again");

    // Answers again: the new set applies.
    dns.set(NAME, &addresses(&backends, &["c"])).await;
    wait_listed(&relay, &urls(&backends, &["c"])).await;
    let mut after = connect_as(&url, "after").await;
    assert_eq!(round_trip(&mut after, "whoami").await, "c");
}

#[tokio::test]
async fn a_name_that_does_not_resolve_at_start_gets_503_until_it_does() {
    let (backends, port) = three_backends();
    let dns = TestDns::start("test.").await;
    let relay = TestRelay::start(&config(&dns, port, ""), &[]).await;
    let url = relay.url("/chat/room");
    assert_eq!(refused_status(&url).await, 503);
    assert!(listed(&relay).await.is_empty());

    dns.set(NAME, &addresses(&backends, &["b"])).await;
    wait_listed(&relay, &urls(&backends, &["b"])).await;
    let mut client = connect_as(&url, "late").await;
    assert_eq!(round_trip(&mut client, "whoami").await, "b");
}

#[tokio::test]
async fn a_reload_that_replaces_discover_stops_its_refreshes() {
    let (backends, port) = three_backends();
    let dns = TestDns::start("test.").await;
    dns.set(NAME, &addresses(&backends, &["a"])).await;
    let relay = TestRelay::start(&config(&dns, port, ""), &[]).await;
    wait_listed(&relay, &urls(&backends, &["a"])).await;

    // `main` gets a fixed list; a new upstream `watched` discovers the same name, so its
    // refreshes show when the DNS answer has been seen.
    let discover = format!("discover = {{ dns = \"chat.test:{port}\", refresh = \"100ms\" }}");
    let fixed = config(&dns, port, "").replace(
        &discover,
        &format!("backends = [\"{}\"]", backends["b"].url()),
    );
    let reloaded = format!(
        "{fixed}\n[[route]]\npath = \"/watched\"\nupstream = \"watched\"\n\n[upstream.watched]\n{discover}\n"
    );
    let reloaded = wsrelay::config::Config::from_toml(&reloaded, "t.toml").unwrap();
    let report = relay.handle.reload(reloaded).await.unwrap();
    assert_eq!(report.added, [backends["b"].url()]);
    assert!(
        report.removed.is_empty(),
        "a stays, in `watched`: {report:?}"
    );

    dns.set(NAME, &addresses(&backends, &["c"])).await;
    wait_listed(&relay, &urls(&backends, &["b", "c"])).await;
    let rows: serde_json::Value =
        serde_json::from_str(&relay.admin_get("/api/backends").await).unwrap();
    let of = |upstream: &str| -> Vec<String> {
        rows.as_array()
            .unwrap()
            .iter()
            .filter(|row| row["upstream"] == upstream)
            .map(|row| row["url"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        of("main"),
        [backends["b"].url()],
        "main no longer discovers"
    );
    assert_eq!(of("watched"), [backends["c"].url()]);
}

#[tokio::test]
async fn aaaa_records_become_bracketed_ipv6_backends() {
    if !has_ipv6_loopback().await {
        eprintln!("SKIPPED aaaa_records_become_bracketed_ipv6_backends: this machine has no [::1]");
        return;
    }
    let backends = backends_on_one_port(&[("v4", ip("127.0.0.2")), ("v6", ip("::1"))]);
    let port = backends["v4"].addr.port();
    let dns = TestDns::start("test.").await;
    dns.set(NAME, &addresses(&backends, &["v4", "v6"])).await;
    let relay = TestRelay::start(&config(&dns, port, ""), &[]).await;
    let both = urls(&backends, &["v4", "v6"]);
    assert!(both[1].starts_with("ws://[::1]:"), "{both:?}");
    wait_listed(&relay, &both).await;
    let url = relay.url("/chat/room");
    for (index, name) in ["v4", "v6"].iter().enumerate() {
        let user = user_ranked_first(&both, index);
        let mut client = connect_as(&url, &user).await;
        assert_eq!(round_trip(&mut client, "whoami").await, *name);
    }
}

#[tokio::test]
async fn a_mux_upstream_gets_links_to_added_addresses_and_moves_streams_off_removed_ones() {
    let listeners = listeners_on_one_port(&[ip("127.0.0.2"), ip("127.0.0.4")]);
    let port = listeners[0].local_addr().unwrap().port();
    let mut listeners = listeners.into_iter();
    let a = MuxBackend::start_on("a", listeners.next().unwrap()).await;
    let b = MuxBackend::start_on("b", listeners.next().unwrap()).await;
    let dns = TestDns::start("test.").await;
    dns.set(NAME, &[ip("127.0.0.2")]).await;
    let source = config(&dns, port, "mux_links = 2").replace(
        "hash_key = \"header:X-User\"",
        "hash_key = \"header:X-User\"\nmode = \"mux\"",
    );
    let relay = TestRelay::start(&source, &[]).await;
    wait_until("two links to a", || a.links_open() == 2).await;
    assert_eq!(b.links_open(), 0);
    let url = relay.url("/chat/room");
    let mut clients = Vec::new();
    for n in 0..4 {
        let mut client = connect_as(&url, &format!("user-{n}")).await;
        assert_eq!(round_trip(&mut client, "whoami").await, "a");
        clients.push(client);
    }

    // b joins: it gets its links.
    dns.set(NAME, &[ip("127.0.0.2"), ip("127.0.0.4")]).await;
    wait_until("two links to b", || b.links_open() == 2).await;
    for client in &mut clients {
        assert_eq!(round_trip(client, "whoami").await, "a");
    }

    // a leaves: its streams move to b, then its links close.
    dns.set(NAME, &[ip("127.0.0.4")]).await;
    for client in &mut clients {
        assert_eq!(moved_from(client, "a").await, "b");
    }
    wait_until("a's links to close", || a.links_open() == 0).await;
    assert_eq!(a.streams_open(), 0);

    // A client multiplexing on its side reaches b too.
    let link = MuxClient::connect(&relay.url("/chat")).await.unwrap();
    let mut stream = link.open("/chat/room", Vec::new()).await.unwrap();
    stream.send(Message::text("whoami")).await.unwrap();
    let reply = within("a reply", stream.next()).await.unwrap().unwrap();
    assert_eq!(reply.to_text().unwrap(), "b");
}

#[tokio::test]
async fn health_checks_cover_discovered_backends() {
    let (backends, port) = three_backends();
    let dns = TestDns::start("test.").await;
    dns.set(NAME, &addresses(&backends, &["a", "b"])).await;
    let relay = TestRelay::start(
        &config(
            &dns,
            port,
            "health_check = { interval = \"100ms\", timeout = \"1s\", unhealthy_after = 1, healthy_after = 1 }",
        ),
        &[],
    )
    .await;
    let mut backends = backends;
    let stopped = backends.remove("b").unwrap().stop();
    let b_url = format!("ws://{}", stopped.addr);
    within("the stopped backend to be unhealthy", async {
        loop {
            let rows: serde_json::Value =
                serde_json::from_str(&relay.admin_get("/api/backends").await).unwrap();
            let unhealthy = rows
                .as_array()
                .unwrap()
                .iter()
                .any(|row| row["url"] == b_url.as_str() && row["healthy"] == false);
            if unhealthy {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let two = [backends["a"].url(), b_url];
    let mut client = connect_as(&relay.url("/chat/room"), &user_ranked_first(&two, 1)).await;
    assert_eq!(round_trip(&mut client, "whoami").await, "a");
}

#[tokio::test]
async fn a_reload_that_changes_the_resolver_asks_the_new_server_from_then_on() {
    let (backends, port) = three_backends();
    let old = TestDns::start("test.").await;
    let new = TestDns::start("test.").await;
    old.set(NAME, &addresses(&backends, &["a"])).await;
    new.set(NAME, &addresses(&backends, &["b"])).await;
    let relay = TestRelay::start(&config(&old, port, ""), &[]).await;
    wait_listed(&relay, &urls(&backends, &["a"])).await;

    let moved = config(&old, port, "").replace(&old.addr().to_string(), &new.addr().to_string());
    let moved = wsrelay::config::Config::from_toml(&moved, "t.toml").unwrap();
    let report = relay.handle.reload(moved).await.unwrap();
    assert_eq!(
        report.added,
        [backends["b"].url()],
        "resolved before it applied"
    );
    assert_eq!(report.removed, [backends["a"].url()]);

    // Only the new server's answers count now: the old one still says `a`.
    new.set(NAME, &addresses(&backends, &["c"])).await;
    wait_listed(&relay, &urls(&backends, &["c"])).await;
    let mut client = connect_as(&relay.url("/chat/room"), "anyone").await;
    assert_eq!(round_trip(&mut client, "whoami").await, "c");
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(listed(&relay).await, urls(&backends, &["c"]));
    }
}
