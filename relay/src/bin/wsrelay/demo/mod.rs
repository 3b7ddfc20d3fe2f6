//! `wsrelay demo`: the relay in front of three built-in backends, serving a chat page, in one
//! command. Routes: `/chat` in mux mode (three chat backends carried over shared mux links,
//! clients hashed by `?user=`) and `/echo` per client (echo backends that answer `whoami`).
//! The page (`page/`, built into the binary) is served by the relay's static-file answer, and
//! taps its own connection's frames on the admin listener. A backend killed from the page or
//! with `/kill NAME` shows the point of the relay: its clients move and keep their sockets.

mod backends;
mod hub;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use wsrelay::config::Config;
use wsrelay::{EmbeddedFiles, Relay};

use crate::explain_bind;
use crate::signals::ShutdownSignals;
use backends::Host;
use hub::Hub;

const NAMES: [&str; 3] = ["alpha", "bravo", "charlie"];

/// The page, built into the binary.
fn page() -> EmbeddedFiles {
    EmbeddedFiles::new()
        .file("/index.html", include_str!("page/index.html"))
        .file("/chat.js", include_str!("page/chat.js"))
        .file("/chat.css", include_str!("page/chat.css"))
}

/// The demo's configuration, as a user would write it; with `tls` (certificate and key) the
/// listener speaks TLS.
fn config(listen: SocketAddr, hosts: &[Host], tls: Option<&(PathBuf, PathBuf)>) -> Result<Config> {
    let list = |url: fn(&Host) -> String| {
        hosts
            .iter()
            .map(|h| format!("\"{}\"", url(h)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let tls = tls.map_or_else(String::new, |(cert, key)| {
        format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        )
    });
    let source = format!(
        r#"
[server]
listen = "{listen}"
admin = "127.0.0.1:0"
shutdown_grace = "5s"
http2 = true
{tls}
[[route]]
path = "/chat"
upstream = "chat"
mode = "mux"
hash_key = "query:user"

[[route]]
path = "/echo"
upstream = "echo"
hash_key = "query:user"

[upstream.chat]
backends = [{chat}]
mux_links = 1
on_backend_loss = "reconnect"
health_check = {{ interval = "1s", timeout = "1s", unhealthy_after = 1, healthy_after = 1 }}

[upstream.echo]
backends = [{echo}]
on_backend_loss = "reconnect"
health_check = {{ interval = "1s", timeout = "1s", unhealthy_after = 1, healthy_after = 1 }}
"#,
        chat = list(Host::chat_url),
        echo = list(Host::echo_url),
    );
    Config::from_toml(&source, "the demo's configuration").context("the demo's configuration")
}

/// Runs the demo until SIGINT or SIGTERM; with `tls` (certificate and key files) over TLS.
pub async fn run(listen: SocketAddr, tls: Option<(PathBuf, PathBuf)>) -> Result<()> {
    let signals = ShutdownSignals::install()?;
    let hub = Arc::new(Hub::new(&NAMES));
    let (kills, kill_requests) = mpsc::channel(16);
    let mut hosts = Vec::new();
    for name in NAMES {
        hosts.push(Host::start(name, hub.clone(), kills.clone()).context("start a demo backend")?);
    }
    let relay = Relay::builder(config(listen, &hosts, tls.as_ref())?)
        .static_files(page())
        .bind()
        .await
        .map_err(|error| explain_bind(error, "wsrelay demo --listen 127.0.0.1:8081"))?;
    let admin = relay
        .admin_addr()
        .context("the demo relay has an admin listener")?;
    hub.set_tap_url(format!("ws://{admin}/api/tap?conn="));
    let hosts = Arc::new(hosts);
    let killer = tokio::spawn(backends::kill_and_restart(
        hosts.clone(),
        hub.clone(),
        kills.clone(),
        kill_requests,
    ));
    drop(kills);

    let addr = relay.local_addr();
    let (web, ws) = match tls {
        Some(_) => (format!("https://{addr}/"), format!("wss://{addr}")),
        None => (format!("http://{addr}/"), format!("ws://{addr}")),
    };
    println!("wsrelay demo: open {web} in a browser (two tabs, to chat between them)");
    println!();
    println!(
        "  relay     {ws}   /chat: mux mode, 3 chat backends; /echo: one backend socket per client"
    );
    println!("  admin     http://{admin}   /metrics  /api/connections  /api/backends  /api/tap");
    println!("  backends  (clients are hashed by ?user=NAME: the same user lands on the same one)");
    for host in hosts.iter() {
        println!(
            "  {:<9} chat {}  echo {}",
            host.name,
            host.chat_url(),
            host.echo_url()
        );
    }
    println!();
    println!("From a terminal (pip install websockets):");
    println!(
        "  python3 -m websockets '{ws}/chat?room=lobby&user=ann'   type a line; `whoami`; `/kill alpha`"
    );
    println!("  python3 -m websockets '{ws}/echo?user=bob'              type `whoami`");
    println!(
        "  wsrelay tap --admin {admin} --route /chat                every frame of the chat, live"
    );
    println!(
        "Kill a backend with its button on the page or `/kill NAME`: its clients move to another backend"
    );
    println!(
        "without losing their sockets; it restarts after {} s. Ctrl-C drains and stops.",
        backends::RESTART_AFTER.as_secs()
    );
    signals.wait(None).await;
    relay.shutdown().await;
    killer.abort();
    for host in hosts.iter() {
        host.kill().await;
    }
    Ok(())
}
