//! [`TestRelay`]: a relay running in the test's own process, from a TOML snippet or the
//! quick-start configuration.

use std::net::SocketAddr;

use wsrelay::config::Config;
use wsrelay::{Relay, RelayBuilder, RelayHandle};

use crate::backend::TestBackend;
use crate::raw::{raw_exchange, status_of};
use crate::wait::WAIT;

/// Turns on logs when `RUST_LOG` is set; harmless to call many times.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// One route `/` over `BACKENDS`, per-client mode, default settings.
pub const SIMPLE: &str = r#"
[[route]]
path = "/"
upstream = "main"

[upstream.main]
backends = BACKENDS
"#;

/// [`SIMPLE`] with the route hashing clients by `hash_key` (`header:X-User`, `query:room` ...).
pub fn simple_hashed(hash_key: &str) -> String {
    SIMPLE.replace(
        "upstream = \"main\"",
        &format!("upstream = \"main\"\nhash_key = \"{hash_key}\""),
    )
}

/// A TOML array of backend URLs: `["ws://a", "ws://b"]`.
pub fn backend_list(urls: &[String]) -> String {
    let quoted: Vec<String> = urls.iter().map(|url| format!("\"{url}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// A relay running in this process.
pub struct TestRelay {
    /// The running relay.
    pub handle: RelayHandle,
}

impl TestRelay {
    /// Starts a relay from a TOML snippet. The snippet may omit `[server] listen` (port 0 is
    /// used) and may write `BACKENDS` where the list of `backends`' URLs goes.
    pub async fn start(toml: &str, backends: &[&TestBackend]) -> TestRelay {
        Self::start_with(toml, backends, |builder| builder).await
    }

    /// Like [`TestRelay::start`], letting the test configure the builder (e.g. register
    /// inspectors of its own, or name the config file).
    pub async fn start_with(
        toml: &str,
        backends: &[&TestBackend],
        configure: impl FnOnce(RelayBuilder) -> RelayBuilder,
    ) -> TestRelay {
        init_logs();
        let urls: Vec<String> = backends.iter().map(|b| b.url()).collect();
        let mut source = toml.replace("BACKENDS", &backend_list(&urls));
        if !source.contains("listen") {
            source = if source.contains("[server]") {
                source.replace("[server]", "[server]\nlisten = \"127.0.0.1:0\"")
            } else {
                format!("[server]\nlisten = \"127.0.0.1:0\"\n{source}")
            };
        }
        // Inspector names are checked when the builder binds, so custom ones may be used here.
        let config: Config = toml::from_str(&source).unwrap_or_else(|e| panic!("{e}"));
        TestRelay {
            handle: configure(Relay::builder(config)).bind().await.unwrap(),
        }
    }

    /// A relay with one route `/` in per-client mode over `backends`, default settings.
    pub async fn simple(backends: &[&TestBackend]) -> TestRelay {
        Self::start(SIMPLE, backends).await
    }

    /// The quick-start relay (`wsrelay --listen ADDR --backend URL`) on `listen` (port 0 for
    /// a free one) over the backend at `backend_url`.
    pub async fn quick(listen: SocketAddr, backend_url: &str) -> TestRelay {
        init_logs();
        let config = Config::quick_start(listen, &[backend_url.to_owned()]).unwrap();
        TestRelay {
            handle: Relay::bind(config).await.unwrap(),
        }
    }

    /// `ws://127.0.0.1:PORT{path}`
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.handle.local_addr())
    }

    /// The relay's client address.
    pub fn addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    /// The body of `GET path` on the admin listener (`[server] admin`), which must answer 200.
    pub async fn admin_get(&self, path: &str) -> String {
        let addr = self.handle.admin_addr().expect("an admin listener");
        let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        let response = raw_exchange(addr, request.as_bytes(), WAIT).await;
        let text = String::from_utf8_lossy(&response).into_owned();
        assert_eq!(status_of(&response), 200, "GET {path}: {text}");
        text.split_once("\r\n\r\n")
            .map_or("", |(_, body)| body)
            .to_owned()
    }

    /// The value of the metrics series `series` (its name with its labels, exactly as
    /// `/metrics` writes them) on the admin listener; fails the test if there is none.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.admin_get("/metrics").await;
        let prefix = format!("{series} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix)?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in {text}"))
    }
}
