//! The demo chat in a real browser: Debian's `chromium`, driven over WebDriver by
//! `chromedriver` (apt: `chromium chromium-driver`). Two browser sessions join one room; one
//! types, the other sees it; the backend serving the first is killed from its page and both
//! keep talking on the sockets they had. Over https (the demo with a test certificate made here)
//! Chromium carries the chat's WebSockets over HTTP/2 by itself (RFC 8441), as the relay's
//! `/api/connections` shows. Screenshots go to `target/browser/`.
//!
//! Without a browser the test writes a banner saying it did not run (on the terminal, past the
//! test harness's capture) and passes, so `cargo test` works on a machine without Chromium;
//! with `WSRELAY_REQUIRE_BROWSER=1` (CI sets it after installing both) a missing browser fails.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;
use wsrelay_testkit::{RelayProcess, TempDir, unused_addr, workspace_root};

/// Browsers start slowly on a loaded machine; every browser-side wait gets this long.
const BROWSER_WAIT: Duration = Duration::from_secs(45);

fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Chromium and its driver, or `None` after saying loudly that the test can't run.
fn browser() -> Option<(PathBuf, PathBuf)> {
    let chromium = on_path(&["chromium", "chromium-browser", "google-chrome"]);
    let driver = on_path(&["chromedriver"]);
    if let (Some(chromium), Some(driver)) = (&chromium, &driver) {
        return Some((chromium.clone(), driver.clone()));
    }
    let missing = match (chromium, driver) {
        (None, None) => "chromium and chromedriver",
        (None, _) => "chromium",
        _ => "chromedriver",
    };
    let banner = format!(
        "\n*** BROWSER TEST NOT RUN: {missing} not found on PATH.\n*** Install them with: apt-get install chromium chromium-driver\n"
    );
    assert!(
        std::env::var_os("WSRELAY_REQUIRE_BROWSER").is_none(),
        "{banner}(WSRELAY_REQUIRE_BROWSER is set)"
    );
    // Straight to the process's stderr: the harness captures only print! and eprint!.
    let _ = std::io::stderr().write_all(banner.as_bytes());
    None
}

/// A running chromedriver; killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start(driver: &Path) -> Driver {
        let port = unused_addr().port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + BROWSER_WAIT;
        while TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver never listened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Driver {
            child,
            url: format!("http://{addr}"),
        }
    }

    /// A new headless browser session with a profile of its own; `trust_any` accepts the
    /// test's own certificate.
    async fn session(&self, chromium: &Path, profile: &Path, trust_any: bool) -> Client {
        let mut args = vec![
            "--headless=new".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1400,850".into(),
            format!("--user-data-dir={}", profile.display()),
        ];
        if trust_any {
            args.push("--ignore-certificate-errors".into());
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": chromium, "args": args }),
        );
        ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .expect("a chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Evaluates `script` (an expression) in the page until it is truthy; returns its value.
async fn until(page: &Client, what: &str, script: &str) -> Value {
    let deadline = Instant::now() + BROWSER_WAIT;
    loop {
        let value = page
            .execute(&format!("return ({script});"), vec![])
            .await
            .unwrap_or(Value::Null);
        let truthy = match &value {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::String(s) => !s.is_empty(),
            Value::Number(n) => n.as_f64() != Some(0.0),
            _ => true,
        };
        if truthy {
            return value;
        }
        assert!(Instant::now() < deadline, "the page never showed {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn join(page: &Client, base: &str, nick: &str, room: &str) -> String {
    page.goto(&format!("{base}#{room}")).await.unwrap();
    let field = page.find(Locator::Id("nick")).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(nick).await.unwrap();
    page.find(Locator::Css("#who button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        page,
        "a connected chat",
        "document.getElementById('state').textContent === 'connected' && document.getElementById('served-name').textContent",
    )
    .await;
    until(
        page,
        "its own name among the members",
        &format!("[...document.querySelectorAll('#members li')].some(li => li.textContent.includes({nick:?}))"),
    )
    .await;
    served_by(page).await
}

async fn served_by(page: &Client) -> String {
    let value = page
        .execute(
            "return document.getElementById('served-name').textContent;",
            vec![],
        )
        .await
        .unwrap();
    value.as_str().unwrap_or_default().to_owned()
}

async fn say(page: &Client, text: &str) {
    let input = page.find(Locator::Id("text")).await.unwrap();
    input.send_keys(text).await.unwrap();
    page.find(Locator::Id("send"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn sees_line(page: &Client, text: &str) {
    until(
        page,
        &format!("the line {text:?}"),
        &format!("[...document.querySelectorAll('#lines li .text')].some(t => t.textContent.includes({text:?}))"),
    )
    .await;
}

async fn screenshot(page: &Client, name: &str) -> PathBuf {
    let folder = workspace_root().join("target/browser");
    std::fs::create_dir_all(&folder).unwrap();
    let file = folder.join(format!("{name}.png"));
    std::fs::write(&file, page.screenshot().await.unwrap()).unwrap();
    file
}

#[tokio::test]
async fn two_browsers_chat_through_the_demo_and_keep_their_sockets_when_a_backend_dies() {
    let Some((chromium, driver)) = browser() else {
        return;
    };
    let addr = unused_addr();
    let mut demo = RelayProcess::spawn(&["demo", "--listen", &addr.to_string()], "info");
    demo.wait_listening(addr).await;
    let base = format!("http://{addr}/");
    let driver = Driver::start(&driver).await;
    let profiles = TempDir::new();
    let ann = driver
        .session(&chromium, &profiles.path().join("ann"), false)
        .await;
    let bob = driver
        .session(&chromium, &profiles.path().join("bob"), false)
        .await;

    let ann_backend = join(&ann, &base, "ann", "browsers").await;
    join(&bob, &base, "bob", "browsers").await;
    say(&ann, "hello from ann's browser").await;
    sees_line(&bob, "hello from ann's browser").await;
    // The tap shows ann her own frames, live from the relay's admin listener.
    until(
        &ann,
        "frames in the tap pane",
        "document.querySelectorAll('#frames li:not(.empty)').length",
    )
    .await;
    screenshot(&ann, "chat-ann").await;
    screenshot(&bob, "chat-bob").await;

    // Kill ann's backend with its button on her page.
    ann.execute(
        "[...document.querySelectorAll('#backends li')].find(li => li.textContent.includes('(you)')).querySelector('button.kill').click(); return true;",
        vec![],
    )
    .await
    .unwrap();
    until(
        &ann,
        "the move to another backend",
        "[...document.querySelectorAll('#lines li.move')].length",
    )
    .await;
    let moved_to = served_by(&ann).await;
    assert_ne!(moved_to, ann_backend, "ann is served by another backend");
    let reconnects = ann
        .execute(
            "return [...document.querySelectorAll('#lines li.system')].filter(li => li.textContent.includes('reconnecting')).length;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(reconnects, json!(0), "ann's page never had to reconnect");

    say(&bob, "bob is still here").await;
    sees_line(&ann, "bob is still here").await;
    say(&ann, "so is ann").await;
    sees_line(&bob, "so is ann").await;
    let shot = screenshot(&ann, "chat-ann-after-kill").await;
    screenshot(&bob, "chat-bob-after-kill").await;
    assert!(shot.metadata().unwrap().len() > 10_000, "a real screenshot");

    ann.close().await.unwrap();
    bob.close().await.unwrap();
    demo.signal("TERM");
    assert!(demo.wait_exit().await.success(), "{:?}", demo.stderr());
}

/// The admin address `wsrelay demo` printed.
fn admin_of(demo: &RelayProcess) -> String {
    demo.stdout()
        .iter()
        .find_map(|line| {
            let rest = line.trim_start().strip_prefix("admin")?.trim_start();
            Some(
                rest.strip_prefix("http://")?
                    .split_whitespace()
                    .next()?
                    .to_owned(),
            )
        })
        .expect("the demo prints its admin address")
}

#[tokio::test]
async fn over_wss_chromium_carries_the_chat_websockets_over_http2() {
    let Some((chromium, driver)) = browser() else {
        return;
    };
    let certificate = wsrelay_testkit::TestCertificate::new();
    let addr = unused_addr();
    let (cert, key) = (certificate.cert_path(), certificate.key_path());
    let mut demo = RelayProcess::spawn(
        &[
            "demo",
            "--listen",
            &addr.to_string(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        "info",
    );
    demo.wait_listening(addr).await;
    wsrelay_testkit::wait_until("the demo banner", || {
        demo.stdout()
            .iter()
            .any(|l| l.contains(&format!("https://{addr}/")))
            && demo
                .stdout()
                .iter()
                .any(|l| l.trim_start().starts_with("admin"))
    })
    .await;
    let base = format!("https://{addr}/");
    let driver = Driver::start(&driver).await;
    let profiles = TempDir::new();
    let ann = driver
        .session(&chromium, &profiles.path().join("ann"), true)
        .await;
    let bob = driver
        .session(&chromium, &profiles.path().join("bob"), true)
        .await;
    join(&ann, &base, "ann", "h2").await;
    join(&bob, &base, "bob", "h2").await;
    say(&ann, "hello over wss").await;
    sees_line(&bob, "hello over wss").await;
    screenshot(&bob, "chat-bob-wss").await;

    // The relay says which HTTP each chat WebSocket came over.
    let admin = admin_of(&demo);
    let listing = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = TcpStream::connect(&admin).await.unwrap();
        let request =
            format!("GET /api/connections HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        answer
    }
    .await;
    let body = listing.split("\r\n\r\n").nth(1).unwrap_or_default();
    let connections: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {listing}"));
    let chats: Vec<&Value> = connections
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["path"].as_str().is_some_and(|p| p.starts_with("/chat")))
        .collect();
    assert_eq!(chats.len(), 2, "{connections}");
    for chat in chats {
        assert_eq!(
            chat["http"], "2",
            "Chromium used HTTP/2 for its WebSocket: {chat}"
        );
    }

    ann.close().await.unwrap();
    bob.close().await.unwrap();
    demo.signal("TERM");
    assert!(demo.wait_exit().await.success(), "{:?}", demo.stderr());
}
