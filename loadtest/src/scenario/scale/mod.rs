//! `scale`: many idle mux clients through several relay processes that share one port, and a
//! check, from the backends' side, that every relay routes every key to the same backend.
//!
//! It starts everything itself and stops by itself: `--backends` recording mux backends
//! ([`recorder`]), then `--relays` relay processes with one config (a mux route with `hash_key
//! = "query:key"`, `reuse_port = true`, every backend; [`fleet`]), then a `hold` of
//! `--connections` clients (worker processes of at most `--per-process` each, over many
//! loopback source addresses, client pings every `--ping-interval`) whose URLs carry `key =
//! INDEX mod --key-space`, so each key's clients land, by the kernel's `SO_REUSEPORT` hashing,
//! on different relays. After `--duration` it reads every backend's records, tells which relay
//! each stream came through from the mux link it came on (the link's relay-side address, owned
//! by one relay process's socket, found in `/proc`: [`crate::sockets`]), checks the routing
//! ([`routing`]), closes the clients and stops every process.
//!
//! It passes when every client connected, none was dropped while held, every client ping was
//! answered, every key reached one backend only (and some keys came through several relays,
//! so the check compared something), every process lived to the end, and the relays let go of
//! every client's socket once the clients closed (all at once: how long that took is reported,
//! and so are the clients that waited more than 2 s for their close reply in that storm). It
//! reports the relays' memory per client and their CPU while holding, relay by relay
//! ([`report`]).
//!
//! Limits of one machine: every process may hold 20,000 files; a mux client costs a relay one
//! socket, so 100,000 clients need 6 relays (~16,700 each, as the kernel spreads them), and the
//! load generator 7 processes of 15,000.

pub mod fleet;
pub mod recorder;
pub mod report;
pub mod routing;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use self::fleet::{Fleet, FleetSpec};
use self::report::{ClientFigures, Closing, ScaleReport, Totals};
use crate::conn::{Connector, TargetUrl, loopback_sources};
use crate::monitor::Watched;
use crate::procstat::{self, GroupSample, MachineInfo, ProcessGroup};
use crate::report::{RoundFigures, TargetReport};
use crate::scenario::hold::{self, HoldObserver, HoldOpts};
use crate::scenario::{CommonOpts, RunTarget};
use crate::targets::Programs;
use crate::units::{parse_duration, ser_duration};
use crate::worker::WorkerLauncher;

/// Open files a relay process needs beside its clients (listener, links, logs, runtime).
const RELAY_FILES_BESIDE_CLIENTS: u64 = 200;

/// How long a backend may take to report its records.
const RECORDS_WITHIN: Duration = Duration::from_secs(60);

/// How long the relays may take, after every client closed, to be back near the open files
/// they had before the clients came.
const RELEASE_WITHIN: Duration = Duration::from_secs(60);

/// Open files above its count before the clients came that a relay may keep after they left
/// (a re-dialled link, a log file).
const FILES_SLACK: u64 = 16;

/// Options of `scale`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct ScaleOpts {
    /// Clients in all.
    #[arg(long, short = 'c', default_value_t = 100_000)]
    pub connections: usize,
    /// How long every client is held once all are connected ("10m").
    #[arg(long, short = 'd', default_value = "10m", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub duration: Duration,
    /// Relay processes sharing the port.
    #[arg(long, default_value_t = 6)]
    pub relays: usize,
    /// Recording mux backends behind them.
    #[arg(long, default_value_t = 2)]
    pub backends: usize,
    /// Tokio worker threads of each relay (`TOKIO_WORKER_THREADS`; 0: tokio's default, one
    /// per core).
    #[arg(long, default_value_t = 1)]
    pub relay_workers: usize,
    /// Keys the clients' URLs carry (`key = INDEX mod N`): each is shared by connections /
    /// N clients.
    #[arg(long, default_value_t = 10_000)]
    pub key_space: usize,
    /// Each client pings this often; a ping not answered by the next is a `pong-timeout`.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub ping_interval: Duration,
    /// New connections per second during the ramp, in total (0: as fast as
    /// `--connect-concurrency` allows).
    #[arg(long, default_value_t = 0.0)]
    pub connect_rate: f64,
    /// Handshakes in progress at once, over all load-generator processes.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Limit for one TCP connect plus WebSocket handshake.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Clients one load-generator process holds (its open-file limit is 20,000 here).
    #[arg(long, default_value_t = 15_000)]
    pub per_process: usize,
    /// Loopback source addresses (127.0.0.1, .2, ...; 0: one per 10,000 clients).
    #[arg(long, default_value_t = 0)]
    pub source_addrs: usize,
    /// Pause after the ramp, before the "loaded" reading and the hold window.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub settle: Duration,
    /// The relay binary (default: `wsrelay` beside this executable).
    #[arg(long, value_name = "PATH")]
    pub relay_bin: Option<PathBuf>,
    /// Run the relay library compiled into this harness instead of the `wsrelay` binary.
    #[arg(long)]
    pub relay_builtin: bool,
    /// `RUST_LOG` of the relays (their logs are in the temp directory; see --keep-files).
    #[arg(long, default_value = "warn")]
    pub relay_log: String,
    /// Keep the relays' config and logs (in the temp directory the report names).
    #[arg(long)]
    pub keep_files: bool,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// No progress bar (it is hidden anyway when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

impl ScaleOpts {
    /// A small run for tests: 600 clients through 3 relays to 2 backends for a second, in two
    /// load-generator processes, 60 keys (10 clients each).
    pub fn tiny() -> ScaleOpts {
        ScaleOpts {
            connections: 600,
            duration: Duration::from_secs(1),
            relays: 3,
            backends: 2,
            relay_workers: 1,
            key_space: 60,
            ping_interval: Duration::from_millis(300),
            connect_rate: 0.0,
            connect_concurrency: 64,
            connect_timeout: Duration::from_secs(10),
            per_process: 300,
            source_addrs: 3,
            settle: Duration::from_millis(200),
            relay_bin: None,
            relay_builtin: true,
            relay_log: "warn".into(),
            keep_files: false,
            json: None,
            no_progress: true,
        }
    }

    /// Checks what no parser can, the open-file limit among it.
    pub fn validate(&self) -> Result<(), String> {
        if self.connections == 0 || self.relays == 0 || self.backends == 0 || self.key_space == 0 {
            return Err(
                "--connections, --relays, --backends and --key-space must be at least 1".into(),
            );
        }
        let limit = procstat::raise_fd_limit();
        // The kernel spreads clients by a hash, not evenly: leave a relay 5% more than its share.
        let per_relay = (self.connections.div_ceil(self.relays) as u64) * 105 / 100;
        if per_relay + RELAY_FILES_BESIDE_CLIENTS > limit {
            return Err(format!(
                "{} clients over {} relays is about {per_relay} open files per relay, above the \
                 limit of {limit} a process has here: add --relays",
                self.connections, self.relays
            ));
        }
        if self.per_process as u64 + RELAY_FILES_BESIDE_CLIENTS > limit {
            return Err(format!(
                "--per-process {} is above the open-file limit of {limit}",
                self.per_process
            ));
        }
        Ok(())
    }

    /// Loopback source addresses the clients use.
    pub fn source_count(&self) -> usize {
        match self.source_addrs {
            0 => self.connections.div_ceil(10_000).max(1),
            n => n,
        }
    }

    /// The options of the `hold` it runs.
    pub fn hold(&self) -> HoldOpts {
        HoldOpts {
            ping_interval: self.ping_interval,
            connect_rate: self.connect_rate,
            per_process: self.per_process,
            settle: self.settle,
            key_space: self.key_space,
        }
    }

    /// The common options of the `hold` it runs.
    pub fn common(&self) -> CommonOpts {
        CommonOpts {
            connections: self.connections,
            duration: self.duration,
            connect_timeout: self.connect_timeout,
            connect_concurrency: self.connect_concurrency,
            source_addrs: self.source_count(),
            no_progress: self.no_progress,
            ..CommonOpts::tiny()
        }
    }

    fn fleet(&self) -> FleetSpec<'_> {
        FleetSpec {
            relays: self.relays,
            backends: self.backends,
            relay_workers: (self.relay_workers > 0).then_some(self.relay_workers),
            relay_log: &self.relay_log,
            keep_files: self.keep_files,
        }
    }
}

/// Errors that stop a scale run before it can judge anything.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    /// Bad options.
    #[error("{0}")]
    Options(String),
    /// A process could not be started.
    #[error(transparent)]
    Start(#[from] crate::targets::StartError),
    /// The relays' URL was refused.
    #[error(transparent)]
    Target(#[from] crate::conn::TargetError),
    /// The hold itself failed (a worker process could not start or report).
    #[error("hold: {0}")]
    Hold(String),
    /// A backend did not give its records.
    #[error(transparent)]
    Records(#[from] recorder::RecordsError),
}

/// Runs the scale test with `programs` (the harness is also the load generator's worker and the
/// backends), judges it, and stops everything it started.
pub async fn run(opts: &ScaleOpts, programs: &Programs) -> Result<ScaleReport, ScaleError> {
    opts.validate().map_err(ScaleError::Options)?;
    let started = Instant::now();
    let mut fleet = Fleet::start(&opts.fleet(), programs)?;
    let relays = fleet.relay_pids();
    let common = opts.common();
    let target = RunTarget {
        label: "scale".into(),
        connector: Connector::new(
            vec![TargetUrl::resolve(&fleet.url(), false).await?],
            loopback_sources(common.source_addrs, 1),
            common.connect_timeout,
        ),
        watched: Watched {
            proxy: ProcessGroup::new(relays.clone()),
            backend: ProcessGroup::new(fleet.backend_pids()),
        },
        show_progress: !common.no_progress,
    };
    let launcher = WorkerLauncher {
        exe: programs.harness.clone(),
    };
    let mut readings = Readings::new(relays.clone(), fleet.backend_addrs());
    readings.before = sample_each(&relays);
    let measured = hold::run_observed(
        &common,
        &opts.hold(),
        &target,
        Some(&launcher),
        &mut readings,
    )
    .await
    .map_err(|e| ScaleError::Hold(format!("{e:#}")))?;
    let closing = match readings.release.take() {
        Some(watch) => watch.await.unwrap_or_default(),
        None => Closing::default(),
    };
    let after = sample_each(&relays);
    let records = fleet.records(RECORDS_WITHIN).await?;
    let routing = routing::check(&records, &readings.owners, &relays);
    let mut clients = ClientFigures::of(&measured, opts.connections);
    clients.closing = closing;
    let deaths = fleet.deaths();
    let backends = report::backend_figures(&fleet.backend_urls(), &fleet.backend_pids(), &routing);
    let relay_figures = report::relay_figures(
        &relays,
        &readings.before,
        &readings.holding,
        &readings.held,
        &after,
        readings.seconds(),
        &routing,
    );
    let mut broken: Vec<String> = deaths
        .iter()
        .map(|d| format!("a process died: {d}"))
        .collect();
    broken.extend(clients.broken());
    let clients_per_key = (opts.connections / opts.key_space) as u64;
    broken.extend(routing.broken(clients.connected, relays.len(), clients_per_key));
    let machine = MachineInfo::read();
    let totals = Totals::of(&relay_figures, &clients, readings.machine_busy(), &machine);
    Ok(ScaleReport {
        scenario: "scale",
        status: if broken.is_empty() { "pass" } else { "fail" },
        broken,
        config: opts.clone(),
        machine,
        relay: programs.relay.describe(),
        relay_config: fleet.config().to_owned(),
        files: fleet.files(),
        wall_s: started.elapsed().as_secs_f64(),
        clients,
        relays: relay_figures,
        totals,
        routing,
        backends,
        hold: TargetReport::measured(
            &measured,
            vec![RoundFigures::of(&measured)],
            "connections/s",
        ),
    })
    // `fleet` drops here: the relays, then the backends, are stopped by pid.
}

/// Each of `pids` read now (zeros for one that is gone).
fn sample_each(pids: &[u32]) -> Vec<GroupSample> {
    pids.iter()
        .map(|&pid| ProcessGroup::new(vec![pid]).sample())
        .collect()
}

/// What the scale run reads of each relay process beside the hold's own readings, and the
/// owners of the mux links while every client is connected.
struct Readings {
    relays: Vec<u32>,
    backends: Vec<SocketAddr>,
    before: Vec<GroupSample>,
    holding: Vec<GroupSample>,
    held: Vec<GroupSample>,
    /// Watches the relays let go of their clients' sockets, from the moment they close.
    release: Option<tokio::task::JoinHandle<Closing>>,
    window: Option<(Instant, (u64, u64))>,
    machine: Option<(f64, (u64, u64))>,
    /// Relay-side address of each mux link -> relay pid, read when every client was connected.
    owners: HashMap<SocketAddr, u32>,
}

impl Readings {
    fn new(relays: Vec<u32>, backends: Vec<SocketAddr>) -> Readings {
        Readings {
            relays,
            backends,
            before: Vec::new(),
            holding: Vec::new(),
            held: Vec::new(),
            release: None,
            window: None,
            machine: None,
            owners: HashMap::new(),
        }
    }

    /// Seconds of the hold window.
    fn seconds(&self) -> f64 {
        self.machine.map_or(0.0, |(s, _)| s)
    }

    /// Fraction of the machine's cores busy over the hold window (0..=1).
    fn machine_busy(&self) -> f64 {
        match (self.window, self.machine) {
            (Some((_, start)), Some((_, end))) => procstat::machine_busy_fraction(start, end),
            _ => 0.0,
        }
    }
}

impl HoldObserver for Readings {
    fn holding(&mut self) {
        self.holding = sample_each(&self.relays);
        let ticks = procstat::machine_cpu_ticks().unwrap_or_default();
        self.window = Some((Instant::now(), ticks));
        // Every stream has been opened by now, on links that are all still up: the links'
        // owners now are the owners of every stream the backends recorded.
        self.owners = fleet::link_owners(&self.relays, &self.backends);
    }

    fn held(&mut self) {
        self.held = sample_each(&self.relays);
        let ticks = procstat::machine_cpu_ticks().unwrap_or_default();
        if let Some((start, _)) = self.window {
            self.machine = Some((start.elapsed().as_secs_f64(), ticks));
        }
        let before = self.before.iter().map(|s| s.fds).collect();
        self.release = Some(tokio::spawn(watch_release(self.relays.clone(), before)));
    }
}

/// Reads the relays' open files every quarter second, from now until every relay is back
/// within [`FILES_SLACK`] of `before` (its count before the clients came) or
/// [`RELEASE_WITHIN`] has passed.
async fn watch_release(relays: Vec<u32>, before: Vec<u64>) -> Closing {
    let started = Instant::now();
    loop {
        let over: u64 = relays
            .iter()
            .zip(&before)
            .map(|(&pid, &was)| {
                procstat::open_fds(pid)
                    .unwrap_or(0)
                    .saturating_sub(was + FILES_SLACK)
            })
            .sum();
        let waited = started.elapsed();
        if over == 0 || waited >= RELEASE_WITHIN {
            return Closing {
                released_after_s: (over == 0).then_some(waited.as_secs_f64()),
                files_still_open: over,
                ..Closing::default()
            };
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
