//! Health (docs/operations.md, "Health"): an unhealthy backend leaves the ranking, so only its own
//! clients move; it comes back after `healthy_after` good probes; with none healthy, clients
//! get 503 with Retry-After; a hung backend (accepts TCP, never answers) is found by the
//! probes' timeout and skipped.

use http::StatusCode;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wsrelay::hashing::Ranking;
use wsrelay_testkit::*;

fn config() -> String {
    r#"
[server]
admin = "127.0.0.1:0"

[[route]]
path = "/"
upstream = "main"
hash_key = "header:X-User"

[upstream.main]
backends = BACKENDS
health_check = { interval = "100ms", timeout = "1s", unhealthy_after = 2, healthy_after = 2 }
"#
    .to_owned()
}

async fn whoami(relay: &TestRelay, user: &str) -> Result<String, StatusCode> {
    match connect_request(request_as(&relay.url("/"), user)).await {
        Ok(mut client) => Ok(round_trip(&mut client, "whoami").await),
        Err(WsError::Http(response)) => Err(response.status()),
        Err(other) => panic!("{other}"),
    }
}

fn refusing() -> BackendBehavior {
    BackendBehavior::refusing(503)
}

#[tokio::test]
async fn an_unhealthy_backend_leaves_the_ranking_and_comes_back() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let c = TestBackend::start("c").await;
    let urls = [a.url(), b.url(), c.url()];
    let relay = TestRelay::start(&config(), &[&a, &b, &c]).await;
    let on_a = user_ranked_first(&urls, 0);
    let on_c = user_ranked_first(&urls, 2);
    assert_eq!(whoami(&relay, &on_a).await, Ok("a".into()));

    // "a" starts answering 503: after two failed probes it is out of every ranking, so its
    // users go to their second choice instead of getting a's 503...
    a.set_behavior(refusing());
    let ranking = Ranking::new(urls.iter().map(|u| (u.as_str(), 1.0)));
    let second = ["a", "b", "c"][ranking.rank(on_a.as_bytes())[1]];
    let deadline = tokio::time::Instant::now() + WAIT;
    while whoami(&relay, &on_a).await != Ok(second.to_owned()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a never left the ranking"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // ...while users of other backends stay where they were.
    assert_eq!(whoami(&relay, &on_c).await, Ok("c".into()));

    // Healthy again: after two good probes a serves its users again.
    a.set_behavior(BackendBehavior::default());
    let deadline = tokio::time::Instant::now() + WAIT;
    while whoami(&relay, &on_a).await != Ok("a".into()) {
        assert!(tokio::time::Instant::now() < deadline, "a never came back");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Probes say who they are.
    assert!(a.connections().iter().any(|seen| {
        seen.headers
            .get("user-agent")
            .is_some_and(|v| v == "wsrelay-health-check")
    }));
}

#[tokio::test]
async fn with_no_healthy_backend_clients_get_503_with_retry_after() {
    let a = TestBackend::with_behavior("a", refusing()).await;
    let relay = TestRelay::start(&config(), &[&a]).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let request = relay.url("/").into_client_request().unwrap();
        match connect_request(request).await {
            Err(WsError::Http(response)) if response.headers().contains_key("retry-after") => {
                assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
                break;
            }
            Err(WsError::Http(response)) => {
                assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE)
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never marked unhealthy"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Readiness follows.
    let admin = relay.handle.admin_addr().unwrap();
    let response = raw_exchange(
        admin,
        b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        WAIT,
    )
    .await;
    assert_eq!(status_of(&response), 503);
}

#[tokio::test]
async fn a_reoriginations_dials_count_toward_passive_health() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let c = TestBackend::start("c").await;
    let urls = [a.url(), b.url(), c.url()];
    // No active checks: only the answers of real dials say anything about b.
    let passive = config().replace("health_check = ", "# health_check = ");
    let relay = TestRelay::start(&passive, &[&a, &b, &c]).await;
    let ranking = Ranking::new(urls.iter().map(|u| (u.as_str(), 1.0)));
    let user = (0..)
        .map(|n| format!("user{n}"))
        .find(|user| ranking.rank(user.as_bytes()) == [0, 1, 2])
        .expect("some user ranks a, b, c");
    let mut request = relay.url("/").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-user", user.parse().unwrap());
    let mut client = connect_request(request).await.unwrap();
    assert_eq!(round_trip(&mut client, "whoami").await, "a");

    // b dies, then a loses its connections: the move tries b first (nothing listens), then
    // lands on c, and b's failed dial marks it unhealthy like a client's own dial would.
    let b_url = b.url();
    b.stop();
    a.kill_connections();
    assert_eq!(round_trip(&mut client, "whoami").await, "c");
    let body = relay.admin_get("/api/backends").await;
    assert_eq!(healthy(&body, &b_url), Some(false), "{body}");
    assert_eq!(healthy(&body, &c.url()), Some(true), "{body}");
}

/// Whether `/api/backends` (its `body`) lists `url` as healthy; `None` if it is not listed.
fn healthy(body: &str, url: &str) -> Option<bool> {
    let rows: serde_json::Value = serde_json::from_str(body).expect("JSON rows");
    rows.as_array()?.iter().find(|row| row["url"] == url)?["healthy"].as_bool()
}

#[tokio::test]
async fn a_hung_backend_is_marked_unhealthy_by_the_probes_and_skipped() {
    let a = TestBackend::start("a").await;
    let hung = HungBackend::start().await;
    let c = TestBackend::start("c").await;
    let urls = [a.url(), hung.url(), c.url()];
    // Dials as patient as the test's own wait: a client dialed to the hung backend would not
    // get its answer in time, so only a skipped backend lets the clients below connect.
    let patient = config()
        .replace("BACKENDS", &backend_list(&urls))
        .replace(
            "[server]",
            "[server]\nhandshake_timeout = \"30s\"\nshutdown_grace = \"1s\"",
        )
        .replace("health_check", "connect_timeout = \"30s\"\nhealth_check");
    let relay = TestRelay::start(&patient, &[]).await;
    let on_c = user_ranked_first(&urls, 2);
    let mut bystander = connect_as(&relay.url("/"), &on_c).await;
    assert_eq!(round_trip(&mut bystander, "whoami").await, "c");

    // Each probe connects and then waits out its timeout: two in a row mark it unhealthy.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = relay.admin_get("/api/backends").await;
        if healthy(&body, &hung.url()) == Some(false) {
            assert_eq!(healthy(&body, &a.url()), Some(true), "{body}");
            assert_eq!(healthy(&body, &c.url()), Some(true), "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hung backend was never marked unhealthy: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let probes = hung.heads();
    assert!(probes.len() >= 2, "{probes:?}");
    assert!(
        probes
            .iter()
            .all(|head| head.to_ascii_lowercase().contains("wsrelay-health-check")),
        "only probes reached it: {probes:?}"
    );

    // New clients whose first choice is the hung backend go to their second, and the relay
    // never dials it for them.
    let ranking = Ranking::new(urls.iter().map(|u| (u.as_str(), 1.0)));
    for user in users_ranked_first(&urls, 1, 5) {
        let second = ["a", "hung", "c"][ranking.rank(user.as_bytes())[1]];
        let mut client = connect_as(&relay.url("/"), &user).await;
        assert_eq!(round_trip(&mut client, "whoami").await, second, "{user}");
    }
    let dialed: Vec<String> = hung
        .heads()
        .into_iter()
        .filter(|head| head.to_ascii_lowercase().contains("x-user"))
        .collect();
    assert!(dialed.is_empty(), "clients were dialed to it: {dialed:?}");
    // The bystander on a healthy backend noticed nothing.
    assert_eq!(round_trip(&mut bystander, "whoami").await, "c");
    assert_eq!(
        c.connections()
            .iter()
            .filter(|seen| seen.header("x-user").as_deref() == Some(on_c.as_str()))
            .count(),
        1
    );
}
