//! Static files beside the WebSockets (`[server] static_dir`): pages with their content types,
//! revalidation by `ETag` and `Last-Modified`, `HEAD`, nothing outside the folder, and
//! upgrades on the same paths still going to the backends.

use wsrelay_testkit::{
    TempDir, TestBackend, TestRelay, WAIT, connect, raw_exchange, round_trip, status_of,
};

/// A folder with a page, a script, a style sheet in a subfolder, and a secret beside it.
struct Site {
    outside: TempDir,
    root: std::path::PathBuf,
}

fn site() -> Site {
    let outside = TempDir::new();
    outside.write("secret.txt", "do not serve");
    let root = outside.path().join("public");
    std::fs::create_dir_all(root.join("css")).unwrap();
    std::fs::create_dir_all(root.join("docs")).unwrap();
    std::fs::write(root.join("index.html"), "<h1>chat</h1>").unwrap();
    std::fs::write(root.join("app.js"), "connect();").unwrap();
    std::fs::write(root.join("css/site.css"), "h1 { color: teal }").unwrap();
    std::fs::write(root.join("docs/index.html"), "<p>docs</p>").unwrap();
    std::fs::write(root.join(".env"), "TOKEN=x").unwrap();
    Site { outside, root }
}

async fn relay_serving(site: &Site, backend: &TestBackend) -> TestRelay {
    let config = format!(
        "[server]\nstatic_dir = {:?}\n\n[[route]]\npath = \"/\"\nupstream = \"main\"\n\n[upstream.main]\nbackends = BACKENDS\n",
        site.root.display().to_string()
    );
    TestRelay::start(&config, &[backend]).await
}

/// A raw request's response: status, head, body.
async fn fetch(relay: &TestRelay, request: &str) -> (u16, String, String) {
    let raw = raw_exchange(relay.addr(), request.as_bytes(), WAIT).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status_of(&raw), head.to_owned(), body.to_owned())
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n{extra}\r\n")
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.trim())
}

#[tokio::test]
async fn pages_are_served_with_their_types_and_revalidate() {
    let backend = TestBackend::start("b").await;
    let site = site();
    let relay = relay_serving(&site, &backend).await;

    let (status, head, body) = fetch(&relay, &get("/", "")).await;
    assert_eq!((status, body.as_str()), (200, "<h1>chat</h1>"), "{head}");
    assert_eq!(header(&head, "content-type"), Some("text/html"));
    for (path, kind, contents) in [
        ("/app.js", "javascript", "connect();"),
        ("/css/site.css", "text/css", "h1 { color: teal }"),
        ("/docs/", "text/html", "<p>docs</p>"),
    ] {
        let (status, head, body) = fetch(&relay, &get(path, "")).await;
        assert_eq!((status, body.as_str()), (200, contents), "{path}: {head}");
        assert!(
            header(&head, "content-type").unwrap().contains(kind),
            "{path}: {head}"
        );
    }

    let tag = header(&head, "etag").expect("an etag").to_owned();
    let modified = header(&head, "last-modified").expect("a date").to_owned();
    let (status, _, body) = fetch(&relay, &get("/", &format!("If-None-Match: {tag}\r\n"))).await;
    assert_eq!((status, body.as_str()), (304, ""));
    let since = format!("If-Modified-Since: {modified}\r\n");
    assert_eq!(fetch(&relay, &get("/", &since)).await.0, 304);

    let head_only = "HEAD /app.js HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n";
    let (status, head, body) = fetch(&relay, head_only).await;
    assert_eq!((status, body.as_str()), (200, ""), "{head}");
    assert_eq!(header(&head, "content-length"), Some("10"));
}

#[tokio::test]
async fn nothing_outside_the_folder_or_hidden_is_served() {
    let backend = TestBackend::start("b").await;
    let site = site();
    let relay = relay_serving(&site, &backend).await;
    for path in [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/css/..%2f..%2fsecret.txt",
        "/.env",
        "/missing.html",
    ] {
        let (status, _, body) = fetch(&relay, &get(path, "")).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(
            !body.contains("do not serve") && !body.contains("TOKEN"),
            "{path}"
        );
    }
    let post =
        "POST /app.js HTTP/1.1\r\nHost: relay\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
    let (status, head, _) = fetch(&relay, post).await;
    assert_eq!(status, 405);
    assert_eq!(header(&head, "allow"), Some("GET, HEAD"));
    drop(site.outside);
}

#[tokio::test]
async fn upgrades_on_the_same_paths_still_reach_the_backend() {
    let backend = TestBackend::start("b").await;
    let site = site();
    let relay = relay_serving(&site, &backend).await;
    let mut client = connect(&relay.url("/")).await;
    assert_eq!(round_trip(&mut client, "whoami").await, "b");
    let (status, _, _) = fetch(&relay, &get("/healthz", "")).await;
    assert_eq!(status, 200);
}
