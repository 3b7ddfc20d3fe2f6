//! The `wsrelay` command: a thin CLI over the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;
use wsrelay::config::Config;
mod demo;

use demo::DemoBackend;
use wsrelay::{Relay, RelayHandle};

/// A WebSocket-terminating message relay: decodes every frame and re-originates each client's
/// conversation to a backend chosen by rendezvous hashing.
#[derive(Debug, Parser)]
#[command(name = "wsrelay", version, about)]
struct Cli {
    /// Run from this TOML config file.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Client listener address (overrides `[server] listen`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Quick start without a config file: a backend URL (repeat for more).
    #[arg(long = "backend", value_name = "URL")]
    backends: Vec<String>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a config file; print each problem with its line; exit 1 if any.
    Check,
    /// Print a relay's frames live, one line each (like tcpdump for WebSocket messages).
    Tap {
        /// The relay's admin listener.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: String,
        /// Tap every connection of the route with this path prefix.
        #[arg(long, conflicts_with = "conn", required_unless_present = "conn")]
        route: Option<String>,
        /// Tap one connection by id.
        #[arg(long)]
        conn: Option<u64>,
        /// Print the raw JSON records.
        #[arg(long)]
        json: bool,
        /// Admin bearer token (or the WSRELAY_ADMIN_TOKEN environment variable).
        #[arg(long, env = "WSRELAY_ADMIN_TOKEN")]
        token: Option<String>,
    },
    /// Run the relay in front of three built-in demo backends.
    Demo {
        /// Client listener address for the demo relay.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let outcome = match &cli.command {
        Some(Command::Check) => check(&cli),
        Some(Command::Demo { listen }) => runtime().and_then(|rt| rt.block_on(demo(*listen))),
        Some(Command::Tap {
            admin,
            route,
            conn,
            json,
            token,
        }) => runtime().and_then(|rt| {
            rt.block_on(tap(admin, route.as_deref(), *conn, *json, token.as_deref()))
        }),
        None => runtime().and_then(|rt| rt.block_on(run(&cli))),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("wsrelay: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")
}

fn load_config(path: &Path) -> Result<Config> {
    let source =
        std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    Ok(Config::from_toml(&source, &path.display().to_string())?)
}

fn config_from_cli(cli: &Cli) -> Result<Config> {
    match (&cli.config, cli.backends.is_empty()) {
        (Some(_), false) => bail!("use either --config or --backend, not both"),
        (Some(path), true) => {
            let mut config = load_config(path)?;
            if let Some(listen) = cli.listen {
                config.server.listen =
                    toml::Spanned::new(0..0, wsrelay::config::ListenAddr(listen));
            }
            Ok(config)
        }
        (None, false) => {
            let listen = cli
                .listen
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080)));
            Ok(Config::quick_start(listen, &cli.backends)?)
        }
        (None, true) => bail!(
            "nothing to relay to: give --config wsrelay.toml, or --backend ws://HOST:PORT (repeatable), or try `wsrelay demo`"
        ),
    }
}

fn check(cli: &Cli) -> Result<()> {
    let Some(path) = &cli.config else {
        bail!("`wsrelay check` needs --config FILE");
    };
    let source =
        std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    match Config::from_toml(&source, &path.display().to_string()) {
        Ok(config) => {
            println!(
                "{}: ok ({} route{}, {} upstream{})",
                path.display(),
                config.routes.len(),
                if config.routes.len() == 1 { "" } else { "s" },
                config.upstreams.len(),
                if config.upstreams.len() == 1 { "" } else { "s" },
            );
            Ok(())
        }
        Err(error) => {
            let lines: Vec<&str> = source.lines().collect();
            for problem in &error.problems {
                println!("{}:{problem}", path.display());
                if let Some(text) = problem.line.and_then(|n| lines.get(n - 1)) {
                    println!("    {:>4} | {text}", problem.line.unwrap_or(0));
                }
            }
            bail!(
                "{} problem{} in {}",
                error.problems.len(),
                if error.problems.len() == 1 { "" } else { "s" },
                path.display()
            )
        }
    }
}

async fn run(cli: &Cli) -> Result<()> {
    let config = config_from_cli(cli)?;
    // Handlers first: a signal that arrives while binding must drain, not kill.
    let signals = ShutdownSignals::install()?;
    let mut builder = Relay::builder(config);
    if let Some(path) = &cli.config {
        builder = builder.config_path(path);
    }
    let relay = builder.bind().await?;
    signals.wait(Some(&relay)).await;
    let report = relay.shutdown().await;
    if report.sessions_aborted > 0 {
        tracing::warn!(
            aborted = report.sessions_aborted,
            "some sessions outlived the grace period"
        );
    }
    Ok(())
}

async fn demo(listen: SocketAddr) -> Result<()> {
    let signals = ShutdownSignals::install()?;
    let mut backends = Vec::new();
    for name in ["alpha", "bravo", "charlie"] {
        backends.push(DemoBackend::start(name, SocketAddr::from(([127, 0, 0, 1], 0))).await?);
    }
    let urls: Vec<String> = backends.iter().map(DemoBackend::url).collect();
    let mut config = Config::quick_start(listen, &urls)?;
    // Demo clients usually come from one address; hash by a query parameter so different
    // users land on different backends, falling back to the address.
    config.routes[0].hash_key = wsrelay::config::HashKey::Query("user".into());
    let relay: RelayHandle = Relay::bind(config).await?;
    let url = format!("ws://{}", relay.local_addr());
    println!("wsrelay demo: relay on {url} in front of 3 echo backends:");
    for backend in &backends {
        println!("  {:<8} {}", backend.name, backend.url());
    }
    println!("Each backend echoes what you send and answers `whoami` with its name.");
    println!(
        "Clients are hashed by ?user=NAME (else by address): the same user always lands on the same backend."
    );
    println!("Try it:");
    println!("  python3 -m websockets '{url}/chat?user=ann'     (pip install websockets)");
    println!("  npx wscat -c '{url}/chat?user=bob'");
    println!("then type: whoami");
    println!("Ctrl-C drains and stops.");
    signals.wait(None).await;
    relay.shutdown().await;
    drop(backends);
    Ok(())
}

/// SIGTERM and SIGINT (drain and stop) and SIGHUP (reload the config file; without one, it is
/// logged and ignored rather than killing the process as its default action would).
struct ShutdownSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> Result<ShutdownSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(ShutdownSignals {
            terminate: signal(SignalKind::terminate()).context("install SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("install SIGINT handler")?,
            hangup: signal(SignalKind::hangup()).context("install SIGHUP handler")?,
        })
    }

    /// Waits for SIGTERM or SIGINT; reloads `relay`'s config file on SIGHUP.
    async fn wait(mut self, relay: Option<&RelayHandle>) {
        loop {
            tokio::select! {
                _ = self.terminate.recv() => break,
                _ = self.interrupt.recv() => break,
                _ = self.hangup.recv() => match relay.map(RelayHandle::reload_from_file) {
                    Some(Ok(report)) => tracing::info!(?report, "SIGHUP: configuration reloaded"),
                    Some(Err(error)) => {
                        tracing::error!("SIGHUP: reload refused, keeping the running configuration: {error}");
                    }
                    None => tracing::warn!("SIGHUP: nothing to reload here"),
                },
            }
        }
        tracing::info!("shutdown signal received");
    }
}

/// `wsrelay tap`: opens the admin tap WebSocket and prints each record.
async fn tap(
    admin: &str,
    route: Option<&str>,
    conn: Option<u64>,
    raw_json: bool,
    token: Option<&str>,
) -> Result<()> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let filter = match (route, conn) {
        (_, Some(id)) => format!("conn={id}"),
        (Some(route), None) => format!("route={}", encode_query(route)),
        (None, None) => bail!("give --route /path or --conn ID"),
    };
    let url = format!("ws://{admin}/api/tap?{filter}");
    let mut request = url.as_str().into_client_request()?;
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .with_context(|| format!("open the tap at {url}"))?;
    eprintln!("tapping {filter} on {admin} (Ctrl-C to stop)");
    let signals = ShutdownSignals::install()?;
    let stop = signals.wait(None);
    tokio::pin!(stop);
    loop {
        let message = tokio::select! {
            message = socket.next() => message,
            () = &mut stop => return Ok(()),
        };
        let Some(message) = message else {
            return Ok(());
        };
        let text = match message? {
            tokio_tungstenite::tungstenite::Message::Text(text) => text,
            tokio_tungstenite::tungstenite::Message::Close(_) => return Ok(()),
            _ => continue,
        };
        if raw_json {
            println!("{}", text.as_str());
        } else {
            println!("{}", tap_line(text.as_str()));
        }
    }
}

/// One readable line for a tap record: time, connection, direction, opcode, length, preview.
fn tap_line(record: &str) -> String {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(record) else {
        return record.to_owned();
    };
    if let Some(lost) = value.get("dropped") {
        return format!("-- tap fell behind: {lost} records lost --");
    }
    let millis = value["time_ms"].as_u64().unwrap_or(0);
    let seconds = millis / 1000;
    let arrow = match value["direction"].as_str() {
        Some("in") => "client -> backend",
        _ => "backend -> client",
    };
    format!(
        "{:02}:{:02}:{:02}.{:03} #{:<6} {arrow} {:<6} {:>7} B  {}",
        (seconds / 3600) % 24,
        (seconds / 60) % 60,
        seconds % 60,
        millis % 1000,
        value["conn"].as_u64().unwrap_or(0),
        value["opcode"].as_str().unwrap_or("?"),
        value["len"].as_u64().unwrap_or(0),
        value["preview"].as_str().unwrap_or(""),
    )
}

/// Percent-encodes what a query value can't carry as is.
fn encode_query(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}
