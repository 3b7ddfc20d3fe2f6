//! The processes of a scale run: recording backends, then relay processes that all run one
//! config file and share one port with `SO_REUSEPORT`. Every process is a [`ChildProcess`]
//! (its own process group, killed if the harness dies) and is stopped by pid when the fleet is
//! dropped: at the end, on an error, or on Ctrl-C.
//!
//! A relay is ready when it holds a listening socket on the shared port *and* its mux links to
//! every backend: a connect to the port proves nothing once the first relay listens, and
//! clients that came before the others listened would all go to the first.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::recorder::{RecordingBackend, Records, RecordsError};
use crate::sockets::{self, STATE_ESTABLISHED};
use crate::targets::{
    ChildProcess, Programs, RelayMode, RelaySpec, StartError, TempDir, check_relay_config,
    free_port, relay_config, spawn_relay,
};

/// Mux links each relay keeps to each backend (`mux_links` in the config the harness writes).
pub const MUX_LINKS: usize = 2;

/// How long a relay may take to listen and link to every backend.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// What to start.
#[derive(Debug, Clone)]
pub struct FleetSpec<'a> {
    /// Relay processes.
    pub relays: usize,
    /// Recording backends.
    pub backends: usize,
    /// `TOKIO_WORKER_THREADS` of each relay (`None`: tokio's default, one per core).
    pub relay_workers: Option<usize>,
    /// `RUST_LOG` of the relays.
    pub relay_log: &'a str,
    /// Keep the config and logs.
    pub keep_files: bool,
}

/// The running processes of a scale run.
#[derive(Debug)]
pub struct Fleet {
    /// Relays, in start order (the report's order).
    relays: Vec<ChildProcess>,
    backends: Vec<RecordingBackend>,
    port: u16,
    config: String,
    // Last, so the processes that use it are stopped before it is removed.
    dir: TempDir,
}

impl Fleet {
    /// Starts the backends, writes and checks the relays' one config, starts the relays one
    /// after the other and waits for each to be ready.
    pub fn start(spec: &FleetSpec<'_>, programs: &Programs) -> Result<Fleet, StartError> {
        let dir = TempDir::new(spec.keep_files).map_err(|e| StartError::Failed {
            what: "create a temp directory".into(),
            reason: e.to_string(),
        })?;
        let mut backends = Vec::new();
        for index in 0..spec.backends {
            backends.push(RecordingBackend::start(&programs.harness, index)?);
        }
        let port = free_port().map_err(|e| StartError::Failed {
            what: "pick the relays' port".into(),
            reason: e.to_string(),
        })?;
        let config = relay_config(
            &RelaySpec {
                mode: RelayMode::Mux,
                backends: backends.iter().map(|b| b.url.clone()).collect(),
                hash_key: format!("query:{}", crate::scenario::hold::KEY_PARAM),
                max_message: 0,
                reuse_port: true,
            },
            port,
        );
        let config_path = dir.path().join("relay.toml");
        std::fs::write(&config_path, &config).map_err(|e| StartError::Failed {
            what: format!("write {}", config_path.display()),
            reason: e.to_string(),
        })?;
        check_relay_config(&programs.relay, &config_path)?;
        let mut fleet = Fleet {
            relays: Vec::new(),
            backends,
            port,
            config,
            dir,
        };
        let backend_addrs: Vec<SocketAddr> = fleet.backends.iter().map(|b| b.addr).collect();
        for index in 0..spec.relays {
            let relay = spawn_relay(
                &format!("relay-{}", index + 1),
                &programs.relay,
                &config_path,
                fleet.dir.path(),
                spec.relay_workers,
                spec.relay_log,
            )?;
            fleet.relays.push(relay);
            let relay = fleet.relays.last_mut().expect("just pushed");
            wait_ready(relay, port, &backend_addrs)?;
        }
        Ok(fleet)
    }

    /// `ws://127.0.0.1:PORT/`, the relays' shared address.
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.port)
    }

    /// The relays' pids, in start order.
    pub fn relay_pids(&self) -> Vec<u32> {
        self.relays.iter().map(ChildProcess::pid).collect()
    }

    /// The backends' pids.
    pub fn backend_pids(&self) -> Vec<u32> {
        self.backends.iter().map(RecordingBackend::pid).collect()
    }

    /// The backends' URLs.
    pub fn backend_urls(&self) -> Vec<String> {
        self.backends.iter().map(|b| b.url.clone()).collect()
    }

    /// The config every relay runs.
    pub fn config(&self) -> &str {
        &self.config
    }

    /// Where the config and the relays' logs are.
    pub fn files(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// Which relay holds each link to a backend: the link's relay-side address -> relay pid.
    pub fn link_owners(&self) -> HashMap<SocketAddr, u32> {
        link_owners(&self.relay_pids(), &self.backend_addrs())
    }

    /// Where the backends listen.
    pub fn backend_addrs(&self) -> Vec<SocketAddr> {
        self.backends.iter().map(|b| b.addr).collect()
    }

    /// Every backend's records, in order.
    pub async fn records(&mut self, timeout: Duration) -> Result<Vec<Records>, RecordsError> {
        let mut all = Vec::new();
        for backend in &mut self.backends {
            all.push(backend.records(timeout).await?);
        }
        Ok(all)
    }

    /// A sentence for every process of the fleet that has exited.
    pub fn deaths(&mut self) -> Vec<String> {
        let relays = self.relays.iter_mut().filter_map(ChildProcess::exited);
        let mut deaths: Vec<String> = relays.collect();
        deaths.extend(
            self.backends
                .iter_mut()
                .filter_map(RecordingBackend::exited),
        );
        deaths
    }
}

/// Links to `backends` held by `relays`: relay-side address -> relay pid.
pub fn link_owners(relays: &[u32], backends: &[SocketAddr]) -> HashMap<SocketAddr, u32> {
    let links = sockets::tcp_sockets(|e| {
        e.state == STATE_ESTABLISHED && e.inode != 0 && backends.contains(&e.remote)
    })
    .unwrap_or_default();
    sockets::owners(&links, relays)
}

/// Waits until `relay` listens on `port` and holds its links to every backend.
fn wait_ready(
    relay: &mut ChildProcess,
    port: u16,
    backends: &[SocketAddr],
) -> Result<(), StartError> {
    let deadline = Instant::now() + READY_WITHIN;
    let not_ready = |relay: &ChildProcess, reason: String| StartError::Failed {
        what: format!("start {}", relay.name()),
        reason,
    };
    loop {
        if let Some(exit) = relay.exited() {
            return Err(not_ready(relay, exit));
        }
        let listening = sockets::listens_on(relay.pid(), port);
        let links = link_owners(&[relay.pid()], backends).len();
        if listening && links >= MUX_LINKS * backends.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(not_ready(
                relay,
                format!(
                    "within {READY_WITHIN:?}: listening on port {port}: {listening}; links to \
                     the backends: {links} of {}{}",
                    MUX_LINKS * backends.len(),
                    relay
                        .log_tail()
                        .map(|t| format!("; log: {t}"))
                        .unwrap_or_default()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
