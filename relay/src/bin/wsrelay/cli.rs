//! The command line: what each command takes, and nothing it would ignore.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// A WebSocket-terminating message relay: decodes every frame and re-originates each client's
/// conversation to a backend chosen by rendezvous hashing.
#[derive(Debug, Parser)]
#[command(
    name = "wsrelay",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// How the relay runs when no command is given.
    #[command(flatten)]
    pub run: RunArgs,
    /// Log format on stderr: `text` (coloured only on a terminal) or `json` (one object a
    /// line).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Another command instead of running the relay.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Running the relay: from a config file, or the quick start from `--backend`s.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Run from this TOML config file (every key: docs/configuration.md; samples in examples/).
    #[arg(long, value_name = "FILE", conflicts_with = "backends")]
    pub config: Option<PathBuf>,
    /// Client listener address; overrides `[server] listen`. The quick start without it
    /// listens on 0.0.0.0:8080, every interface.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Quick start without a config file: a backend URL (repeat for more); one route `/`,
    /// one backend WebSocket per client, clients hashed by their address.
    #[arg(long = "backend", value_name = "URL")]
    pub backends: Vec<String>,
}

/// The commands besides running the relay.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a config file: print every problem with its line; exit 1 if there is any.
    Check {
        /// The TOML config file to check.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print a running relay's frames live, one line each (like tcpdump for WebSocket
    /// messages), from its admin listener.
    Tap {
        /// The relay's admin listener (`[server] admin`).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090")]
        admin: String,
        /// Tap every connection of the route with this path.
        #[arg(long, conflicts_with = "conn", required_unless_present = "conn")]
        route: Option<String>,
        /// Tap one connection by id (see `GET /api/connections`).
        #[arg(long)]
        conn: Option<u64>,
        /// Print the raw JSON records.
        #[arg(long)]
        json: bool,
        /// Admin bearer token (or the WSRELAY_ADMIN_TOKEN environment variable).
        #[arg(long, env = "WSRELAY_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Ask a running relay to reload its config file (as SIGHUP does), via its admin listener.
    Reload {
        /// The relay's admin listener (`[server] admin`).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090")]
        admin: String,
        /// Admin bearer token (or the WSRELAY_ADMIN_TOKEN environment variable).
        #[arg(long, env = "WSRELAY_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Run the relay in front of three built-in demo backends.
    Demo {
        /// Client listener address for the demo relay (pick another if 8080 is taken).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Serve the page and its WebSockets over TLS with this PEM certificate chain (browsers
        /// then carry the WebSockets over HTTP/2).
        #[arg(long, value_name = "PEM", requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// The private key of `--tls-cert`.
        #[arg(long, value_name = "PEM", requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
    },
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// For people.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}
