//! The churn proof (issue #11, item 5; docs/testing.md, "The churn proof"): clients on three
//! routes talk without pause while their backend sets change 100 times, half by DNS (a
//! `discover` upstream answered by the test's own [`TestDns`]) and half by reloads (adds,
//! removes and reweights of a per-client and a mux upstream). Checked for every client: its
//! socket stays open; every message comes back in order and once (and
//! reaches the backends once); a client whose backend stayed in every set was never
//! re-originated; a client of a removed backend ends up talking to one of the final set. On
//! every route, mux included, a planned move delivers each message exactly once: to the
//! client and at the backends.
//!
//! The default run is sized for `cargo test` on a shared machine (240 clients, changes every
//! 150 ms); `WSRELAY_FULL_CHURN=1` runs the issue's size: 1,000 clients, 100 changes in a
//! minute.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use wsrelay_testkit::*;
use wsrelay_tests::MuxBackend;

const NAME: &str = "churn.test.";

/// How big a run is.
struct Size {
    clients: usize,
    changes: usize,
    period: Duration,
    messages: u32,
}

fn size() -> Size {
    if std::env::var_os("WSRELAY_FULL_CHURN").is_some_and(|v| v == "1") {
        Size {
            clients: 1000,
            changes: 100,
            period: Duration::from_millis(600),
            messages: 60,
        }
    } else {
        Size {
            clients: 240,
            changes: 100,
            period: Duration::from_millis(150),
            messages: 40,
        }
    }
}

/// The three routes, each over an upstream of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Route {
    /// Per-client, backends from DNS.
    Dns,
    /// Per-client, backends from reloads.
    Reload,
    /// Mux, backends from reloads.
    Mux,
}

impl Route {
    const ALL: [Route; 3] = [Route::Dns, Route::Reload, Route::Mux];

    fn path(self) -> &'static str {
        match self {
            Route::Dns => "/dns",
            Route::Reload => "/reload",
            Route::Mux => "/mux",
        }
    }
}

/// One upstream's backend set as the test changes it: who is in it, with which weight, and
/// who was ever left out of it. The first backend is never removed (only reweighted), so that
/// some clients have a backend that stays.
struct Set {
    /// Backend name (its `whoami`) to its URL.
    urls: BTreeMap<String, String>,
    active: BTreeMap<String, f64>,
    ever_removed: BTreeSet<String>,
}

impl Set {
    /// The backends of `pool`, by name, the first three of them active.
    fn of<B>(pool: &BTreeMap<String, B>, url: fn(&B) -> String) -> Set {
        let urls: BTreeMap<String, String> =
            pool.iter().map(|(n, b)| (n.clone(), url(b))).collect();
        let active = urls.keys().take(3).map(|n| (n.clone(), 1.0)).collect();
        Set {
            urls,
            active,
            ever_removed: BTreeSet::new(),
        }
    }

    /// One random change: an add, a remove (never below two backends) or, if `reweight`, a new
    /// weight for one of them. Returns what it did.
    fn change(&mut self, rng: &mut fastrand::Rng, reweight: bool) -> &'static str {
        let inactive: Vec<String> = self
            .urls
            .keys()
            .filter(|n| !self.active.contains_key(*n))
            .cloned()
            .collect();
        let choices = if reweight { 3 } else { 2 };
        let mut pick = rng.usize(..choices);
        if (pick == 0 && inactive.is_empty()) || (pick == 1 && self.active.len() <= 2) {
            pick = if inactive.is_empty() { 1 } else { 0 };
        }
        let actives: Vec<String> = self.active.keys().cloned().collect();
        let anchor = self.urls.keys().next().expect("a backend");
        let removable: Vec<&String> = actives.iter().filter(|n| *n != anchor).collect();
        match pick {
            0 => {
                self.active
                    .insert(inactive[rng.usize(..inactive.len())].clone(), 1.0);
                "add"
            }
            1 => {
                let gone = removable[rng.usize(..removable.len())];
                self.active.remove(gone);
                self.ever_removed.insert(gone.clone());
                "remove"
            }
            _ => {
                let name = &actives[rng.usize(..actives.len())];
                self.active
                    .insert(name.clone(), [0.5, 1.0, 2.0, 3.0][rng.usize(..4)]);
                "reweight"
            }
        }
    }

    /// The TOML `backends` list of the active set, weights included.
    fn toml(&self) -> String {
        let entries: Vec<String> = self
            .active
            .iter()
            .map(|(name, weight)| {
                format!("{{ url = \"{}\", weight = {weight:.1} }}", self.urls[name])
            })
            .collect();
        format!("[{}]", entries.join(", "))
    }
}

fn config(dns: &TestDns, port: u16, reloaded: &Set, mux: &Set) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
resolver = "{}"
shutdown_grace = "200ms"

[keepalive]
ping_interval = "0s"

[[route]]
path = "/dns"
upstream = "dns"
hash_key = "header:X-User"

[[route]]
path = "/reload"
upstream = "reloaded"
hash_key = "header:X-User"

[[route]]
path = "/mux"
upstream = "mux"
hash_key = "header:X-User"
mode = "mux"

[upstream.dns]
discover = {{ dns = "churn.test:{port}", refresh = "50ms" }}

[upstream.reloaded]
backends = {}

[upstream.mux]
backends = {}
mux_links = 1
"#,
        dns.addr(),
        reloaded.toml(),
        mux.toml()
    )
}

/// What one client saw.
struct Talk {
    route: Route,
    user: String,
    first: String,
    last: String,
    /// The sequence numbers of its echoes in arrival order, duplicates included.
    echoes: Vec<u32>,
    /// Answers to its first `whoami` that came again: a mux move replayed it.
    whoami_again: usize,
    /// How long each numbered message took to come back (its first echo).
    round_trips: Vec<Duration>,
}

/// A client halfway: its socket's halves and what it saw so far.
struct Talking {
    sink: futures_util::stream::SplitSink<Client, Message>,
    stream: futures_util::stream::SplitStream<Client>,
    talk: Talk,
}

/// One text a client got back.
enum Echo {
    /// The echo of its message `USER:N`.
    Numbered(u32),
    /// The echo of its last message, `USER:end`.
    End,
    /// A backend's name: the answer to a `whoami`.
    Name(String),
}

impl Echo {
    fn of(user: &str, text: String) -> Echo {
        match text
            .strip_prefix(user)
            .and_then(|rest| rest.strip_prefix(':'))
        {
            Some("end") => Echo::End,
            Some(n) => Echo::Numbered(n.parse().unwrap_or_else(|_| panic!("{user}: {text:?}"))),
            None => Echo::Name(text),
        }
    }
}

/// Sends `messages` numbered messages `period` apart while reading their echoes, until each
/// has come back. Panics (failing the test) if the socket ends or goes quiet for [`WAIT`].
async fn talk(
    client: Client,
    route: Route,
    user: String,
    first: String,
    size: (u32, Duration),
) -> Talking {
    let (messages, period) = size;
    let (mut sink, mut stream) = client.split();
    let mut talk = Talk {
        route,
        user,
        last: String::new(),
        first,
        echoes: Vec::new(),
        whoami_again: 0,
        round_trips: Vec::new(),
    };
    let user = &talk.user;
    let sent_at = std::sync::Mutex::new(Vec::with_capacity(messages as usize));
    let writer = async {
        for n in 0..messages {
            sent_at.lock().unwrap().push(tokio::time::Instant::now());
            sink.send(Message::text(format!("{user}:{n}")))
                .await
                .unwrap_or_else(|e| panic!("{user}: send {n}: {e}"));
            tokio::time::sleep(period).await;
        }
    };
    let mut unique = HashSet::new();
    let (echoes, whoami_again, round_trips) = (
        &mut talk.echoes,
        &mut talk.whoami_again,
        &mut talk.round_trips,
    );
    let reader = async {
        while unique.len() < messages as usize {
            match Echo::of(user, next_text(&mut stream, user).await) {
                Echo::Numbered(n) => {
                    let sent = sent_at.lock().unwrap().get(n as usize).copied();
                    if unique.insert(n)
                        && let Some(sent) = sent
                    {
                        round_trips.push(sent.elapsed());
                    }
                    echoes.push(n);
                }
                Echo::Name(_) if route == Route::Mux => *whoami_again += 1,
                Echo::Name(name) => panic!("{user}: its whoami answered again, by {name}"),
                Echo::End => panic!("{user}: an end it did not send"),
            }
        }
    };
    tokio::join!(writer, reader);
    Talking { sink, stream, talk }
}

/// After the churn: sends `USER:end` and `whoami`; the name after the end's echo is the
/// backend serving the client now (late duplicates and replayed answers come before it).
async fn finish(mut talking: Talking) -> Talk {
    let talk = &mut talking.talk;
    let user = talk.user.clone();
    for text in [format!("{user}:end"), "whoami".to_owned()] {
        talking.sink.send(Message::text(text)).await.unwrap();
    }
    loop {
        match Echo::of(&user, next_text(&mut talking.stream, &user).await) {
            Echo::Numbered(n) => talk.echoes.push(n),
            Echo::Name(_) => talk.whoami_again += 1,
            Echo::End => break,
        }
    }
    match Echo::of(&user, next_text(&mut talking.stream, &user).await) {
        Echo::Name(name) => talk.last = name,
        _ => panic!("{user}: no answer to its last whoami"),
    }
    talking.talk
}

/// The next text message; panics if the socket ends or stays quiet for [`WAIT`].
async fn next_text(stream: &mut futures_util::stream::SplitStream<Client>, user: &str) -> String {
    loop {
        match tokio::time::timeout(WAIT, stream.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => return text.as_str().to_owned(),
            Ok(Some(Ok(Message::Close(frame)))) => panic!("{user}: closed by the relay: {frame:?}"),
            Ok(Some(Ok(_))) => {}
            other => panic!("{user}: the socket ended: {other:?}"),
        }
    }
}

/// Waits until `/api/backends` lists exactly `urls` for `upstream`.
async fn wait_listed(relay: &TestRelay, upstream: &str, urls: BTreeSet<String>) {
    within(&format!("{upstream} to list {urls:?}"), async {
        loop {
            let rows: serde_json::Value =
                serde_json::from_str(&relay.admin_get("/api/backends").await).unwrap();
            let listed: BTreeSet<String> = rows
                .as_array()
                .unwrap()
                .iter()
                .filter(|row| row["upstream"] == upstream)
                .map(|row| row["url"].as_str().unwrap().to_owned())
                .collect();
            if listed == urls {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_set_changes_drop_no_client_and_lose_no_message() {
    let size = size();
    let mut rng = fastrand::Rng::with_seed(20261201);

    // Per-client backends found by DNS: six loopback addresses on one port.
    let addresses: Vec<IpAddr> = [2, 4, 5, 6, 7, 8]
        .iter()
        .map(|n| IpAddr::from([127, 0, 0, *n]))
        .collect();
    let named: Vec<(String, IpAddr)> = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("d{i}"), *a))
        .collect();
    let named_refs: Vec<(&str, IpAddr)> = named.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    let dns_backends = backends_on_one_port(&named_refs);
    let port = dns_backends["d0"].addr.port();
    let mut dns_set = Set::of(&dns_backends, TestBackend::url);
    // Per-client and mux backends changed by reloads.
    let mut reload_backends = BTreeMap::new();
    for n in 0..6 {
        let name = format!("r{n}");
        reload_backends.insert(name.clone(), TestBackend::start(&name).await);
    }
    let mut reload_set = Set::of(&reload_backends, TestBackend::url);
    let mut mux_backends = BTreeMap::new();
    for n in 0..5 {
        let name = format!("m{n}");
        mux_backends.insert(name.clone(), MuxBackend::start(&name).await);
    }
    let mut mux_set = Set::of(&mux_backends, MuxBackend::url);

    let dns = TestDns::start("test.").await;
    let dns_addresses = |set: &Set| -> Vec<IpAddr> {
        set.active
            .keys()
            .map(|n| dns_backends[n].addr.ip())
            .collect()
    };
    dns.set(NAME, &dns_addresses(&dns_set)).await;
    let relay = TestRelay::start(&config(&dns, port, &reload_set, &mux_set), &[]).await;
    wait_until("a link to each mux backend", || {
        mux_set
            .active
            .keys()
            .all(|n| mux_backends[n].links_open() == 1)
    })
    .await;

    // Every client connects before the churn starts and says where it landed.
    let mut clients = Vec::new();
    for index in 0..size.clients {
        let route = Route::ALL[index % 3];
        let user = format!("{route:?}-{index}").to_lowercase();
        let mut client = connect_as(&relay.url(route.path()), &user).await;
        let first = round_trip(&mut client, "whoami").await;
        clients.push((client, route, user, first));
    }
    let talking: Vec<_> = clients
        .into_iter()
        .map(|(client, route, user, first)| {
            tokio::spawn(talk(
                client,
                route,
                user,
                first,
                (
                    size.messages,
                    size.period * size.changes as u32 / size.messages,
                ),
            ))
        })
        .collect();

    // The churn: DNS and reloads take turns.
    let mut done: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for change in 0..size.changes {
        if change % 2 == 0 {
            let what = dns_set.change(&mut rng, false);
            dns.set(NAME, &dns_addresses(&dns_set)).await;
            wait_listed(
                &relay,
                "dns",
                dns_set
                    .active
                    .keys()
                    .map(|n| dns_set.urls[n].clone())
                    .collect(),
            )
            .await;
            *done.entry(("dns", what)).or_default() += 1;
        } else {
            let (upstream, what) = if rng.bool() {
                ("reloaded", reload_set.change(&mut rng, true))
            } else {
                ("mux", mux_set.change(&mut rng, true))
            };
            let source = config(&dns, port, &reload_set, &mux_set);
            let next = wsrelay::config::Config::from_toml(&source, "churn.toml").unwrap();
            relay.handle.reload(next).await.unwrap();
            *done.entry((upstream, what)).or_default() += 1;
        }
        tokio::time::sleep(size.period).await;
    }

    let mut halfway = Vec::new();
    for task in talking {
        halfway.push(task.await.expect("a client failed"));
    }
    // Clients of removed backends have left them (after the grace) before they say where
    // they are now.
    let still_served = || {
        let mut left: Vec<String> = Vec::new();
        for (set, pool) in [(&dns_set, &dns_backends), (&reload_set, &reload_backends)] {
            left.extend(
                pool.iter()
                    .filter(|(n, b)| !set.active.contains_key(*n) && b.open() > 0)
                    .map(|(n, b)| format!("{n}: {} open", b.open())),
            );
        }
        left.extend(
            mux_backends
                .iter()
                .filter(|(n, b)| !mux_set.active.contains_key(*n) && b.streams_open() > 0)
                .map(|(n, b)| format!("{n}: {} streams", b.streams_open())),
        );
        left
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while !still_served().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "clients stayed on removed backends: {:?}",
            still_served()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let finishing: Vec<_> = halfway
        .into_iter()
        .map(|t| tokio::spawn(finish(t)))
        .collect();
    let mut talks = Vec::new();
    for task in finishing {
        talks.push(task.await.expect("a client failed at the end"));
    }
    check(
        &talks,
        &size,
        &done,
        &dns_set,
        &reload_set,
        &mux_set,
        &dns_backends,
        &reload_backends,
        &mux_backends,
    );
}

/// The backend-side legs (per-client connections, mux streams) `user` was given, over a pool.
fn legs(
    route: Route,
    user: &str,
    dns: &BTreeMap<String, TestBackend>,
    reload: &BTreeMap<String, TestBackend>,
    mux: &BTreeMap<String, MuxBackend>,
) -> usize {
    let mine = |header: Option<String>| header.as_deref() == Some(user);
    match route {
        Route::Dns => dns
            .values()
            .flat_map(|b| b.connections())
            .filter(|s| mine(s.header("x-user")))
            .count(),
        Route::Reload => reload
            .values()
            .flat_map(|b| b.connections())
            .filter(|s| mine(s.header("x-user")))
            .count(),
        Route::Mux => mux
            .values()
            .flat_map(|b| b.streams())
            .filter(|s| mine(s.header("x-user")))
            .count(),
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    talks: &[Talk],
    size: &Size,
    done: &BTreeMap<(&str, &str), usize>,
    dns_set: &Set,
    reload_set: &Set,
    mux_set: &Set,
    dns: &BTreeMap<String, TestBackend>,
    reload: &BTreeMap<String, TestBackend>,
    mux: &BTreeMap<String, MuxBackend>,
) {
    let set_of = |route: Route| match route {
        Route::Dns => dns_set,
        Route::Reload => reload_set,
        Route::Mux => mux_set,
    };
    let mut summary: BTreeMap<Route, [usize; 6]> = BTreeMap::new();
    // Round trips per route, of clients whose backend stayed and of the others.
    let mut round_trips: BTreeMap<(Route, bool), Vec<Duration>> = BTreeMap::new();
    for talk in talks {
        let user = &talk.user;
        let set = set_of(talk.route);
        // In order and without loss: the first arrival of each number is the next one.
        let mut seen = HashSet::new();
        let firsts: Vec<u32> = talk
            .echoes
            .iter()
            .copied()
            .filter(|n| seen.insert(*n))
            .collect();
        assert_eq!(
            firsts,
            (0..size.messages).collect::<Vec<_>>(),
            "{user}: lost or out of order"
        );
        let duplicates = talk.echoes.len() - firsts.len();
        assert_eq!(
            (duplicates, talk.whoami_again),
            (0, 0),
            "{user}: duplicates on {:?}: {:?}",
            talk.route,
            talk.echoes
        );
        let legs = legs(talk.route, user, dns, reload, mux);
        let stayed = !set.ever_removed.contains(&talk.first);
        if stayed {
            assert_eq!(
                talk.last, talk.first,
                "{user}: its backend stayed, it did not"
            );
            assert_eq!(
                legs, 1,
                "{user}: its backend stayed, yet it was re-originated"
            );
        } else {
            assert!(
                set.active.contains_key(&talk.last),
                "{user}: talks to {} at the end, not in {:?}",
                talk.last,
                set.active
            );
        }
        round_trips
            .entry((talk.route, stayed))
            .or_default()
            .extend(&talk.round_trips);
        let row = summary.entry(talk.route).or_default();
        row[0] += 1;
        row[1] += usize::from(stayed);
        row[2] += usize::from(legs > 1);
        row[3] += talk.echoes.len();
        row[4] += duplicates;
        row[5] += talk.whoami_again;
    }
    // Exactly once at the per-client backends too: each message reached one backend once.
    let mut at_backends: HashMap<String, usize> = HashMap::new();
    for backend in dns.values().chain(reload.values()) {
        for text in backend.texts().into_iter().filter(|t| t != "whoami") {
            *at_backends.entry(text).or_default() += 1;
        }
    }
    let twice: Vec<_> = at_backends.iter().filter(|(_, n)| **n > 1).collect();
    let per_client = talks.iter().filter(|t| t.route != Route::Mux).count();
    println!(
        "churn: {} clients, {} messages each; set changes: {done:?}",
        talks.len(),
        size.messages
    );
    for (route, [clients, stayed, moved, echoes, duplicates, whoami_again]) in &summary {
        println!(
            "churn: {route:?}: {clients} clients, {stayed} whose backend stayed (0 of them re-originated), {moved} re-originated, {echoes} echoes of numbered messages, {duplicates} of them duplicates, {whoami_again} first whoami answered again; 0 lost, 0 out of order, 0 sockets dropped"
        );
    }
    for ((route, stayed), mut times) in round_trips {
        if times.is_empty() {
            continue;
        }
        times.sort();
        let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
        println!(
            "churn: {route:?}: round trips of clients whose backend {}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} echoes)",
            if stayed { "stayed" } else { "changed" },
            at(0.5),
            at(0.99),
            at(1.0),
            times.len()
        );
    }
    println!(
        "churn: per-client backends: {} messages, {} reached a backend twice",
        at_backends.len(),
        twice.len()
    );
    assert!(
        twice.is_empty(),
        "{} messages reached a per-client backend twice, e.g. {:?}",
        twice.len(),
        twice.first()
    );
    // The numbered messages and each client's `USER:end`.
    assert_eq!(
        at_backends.len(),
        per_client * (size.messages as usize + 1),
        "every message reached a backend"
    );
    // And once at the mux backends: the numbered messages, `USER:end` and two `whoami`s.
    let mux_clients = talks.len() - per_client;
    let at_mux_backends: usize = mux.values().map(MuxBackend::messages).sum();
    println!("churn: mux backends: {at_mux_backends} messages received");
    assert_eq!(
        at_mux_backends,
        mux_clients * (size.messages as usize + 3),
        "mux backends received a message twice, or missed one"
    );
    assert!(
        summary.values().map(|row| row[2]).sum::<usize>() > 0,
        "no client moved: the churn proved nothing"
    );
}
