//! `compare`: one scenario against several targets on this machine, side by side.
//!
//! It starts its own backends (`serve echo`, or `serve chat` for fanout) and, in front of the
//! same backends, a relay in per-client mode, a relay in mux mode (with mux backends; skipped
//! when this relay build or the mux example is missing), and the peer proxies a user would
//! otherwise run: nginx configured the classic way, HAProxy and Caddy (each skipped, with one
//! line saying so, when it is not installed; see [`crate::targets::Peer`]). Then it runs the scenario against each target in
//! turn, `--rounds` times, rotating the order every round so that drift of a shared, noisy
//! machine spreads over all targets alike; the rounds of a target are merged. Every process it
//! started is stopped at the end, on error, and on Ctrl-C (see [`crate::targets`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::backend::BackendKind;
use crate::monitor::Watched;
use crate::procstat::{MachineInfo, ProcessGroup};
use crate::report::{self, RoundFigures, RunReport, TargetReport};
use crate::run::{ScenarioOpts, config_json, connector, run_scenario, unix_now};
use crate::scenario::churn::ChurnOpts;
use crate::scenario::echo::EchoOpts;
use crate::scenario::fanout::FanoutOpts;
use crate::scenario::hold::HoldOpts;
use crate::scenario::rate::{RateOpts, Slo};
use crate::scenario::{CommonOpts, Measurement, RunTarget};
use crate::targets::{
    self, Backend, ChildProcess, Peer, PeerHash, PeerProxy, RelayBin, RelayMode, RelaySpec,
    StartError, TempDir,
};
use crate::worker::WorkerLauncher;

/// The scenarios `compare` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScenarioKind {
    /// Closed loop echo.
    Echo,
    /// Open loop at `--rate`.
    Rate,
    /// Chat rooms.
    Fanout,
    /// Idle connections.
    Hold,
    /// Connect, one message, close.
    Churn,
}

/// The targets `compare` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// The backends themselves.
    Direct,
    /// wsrelay, per-client mode.
    PerClient,
    /// wsrelay, mux mode.
    Mux,
    /// nginx, the classic WebSocket proxy config.
    Nginx,
    /// HAProxy, `balance source` with `hash-type consistent`.
    Haproxy,
    /// Caddy, `reverse_proxy` with `lb_policy ip_hash`.
    Caddy,
}

impl TargetKind {
    fn name(self) -> &'static str {
        match self {
            TargetKind::Direct => "direct",
            TargetKind::PerClient => "per-client",
            TargetKind::Mux => "mux",
            TargetKind::Nginx => "nginx",
            TargetKind::Haproxy => "haproxy",
            TargetKind::Caddy => "caddy",
        }
    }

    /// The peer proxy this target runs, if it is one.
    pub fn peer(self) -> Option<Peer> {
        match self {
            TargetKind::Direct | TargetKind::PerClient | TargetKind::Mux => None,
            TargetKind::Nginx => Some(Peer::Nginx),
            TargetKind::Haproxy => Some(Peer::Haproxy),
            TargetKind::Caddy => Some(Peer::Caddy),
        }
    }
}

impl From<Peer> for TargetKind {
    fn from(peer: Peer) -> TargetKind {
        match peer {
            Peer::Nginx => TargetKind::Nginx,
            Peer::Haproxy => TargetKind::Haproxy,
            Peer::Caddy => TargetKind::Caddy,
        }
    }
}

/// Options of `compare`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct CompareOpts {
    /// The scenario to run against every target.
    #[arg(long, value_enum, default_value_t = ScenarioKind::Echo)]
    pub scenario: ScenarioKind,
    /// Targets, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,per-client,mux,nginx,haproxy,caddy"
    )]
    pub targets: Vec<TargetKind>,
    /// Rounds: each target runs the scenario once per round (order rotated every round).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Backend processes behind every target.
    #[arg(long, default_value_t = 1)]
    pub backends: usize,
    /// The `wsrelay` binary (default: `wsrelay` beside this executable).
    #[arg(long)]
    pub relay_bin: Option<PathBuf>,
    /// Run the relay library compiled into this harness instead of a `wsrelay` binary (for
    /// tests; it logs nothing, unlike the binary).
    #[arg(long)]
    pub relay_builtin: bool,
    /// `RUST_LOG` of the relay (its log goes to a file in the temp dir).
    #[arg(long, default_value = "info")]
    pub relay_log: String,
    /// nginx binary (default: `nginx` on PATH or /usr/sbin/nginx).
    #[arg(long)]
    pub nginx_bin: Option<PathBuf>,
    /// HAProxy binary (default: `haproxy` on PATH or /usr/sbin/haproxy).
    #[arg(long)]
    pub haproxy_bin: Option<PathBuf>,
    /// Caddy binary (default: `caddy` on PATH or /usr/bin/caddy).
    #[arg(long)]
    pub caddy_bin: Option<PathBuf>,
    /// The mux echo backend (default: `examples/mux_echo_backend` beside this executable).
    #[arg(long)]
    pub mux_backend_bin: Option<PathBuf>,
    /// Worker threads of the relay (`TOKIO_WORKER_THREADS`), nginx's `worker_processes`,
    /// HAProxy's `nbthread` and Caddy's `GOMAXPROCS`; default: the relay as shipped (one
    /// thread per core), each peer proxy 1.
    #[arg(long)]
    pub proxy_workers: Option<usize>,
    /// Keep the temp dir (configs, logs) for inspection.
    #[arg(long)]
    pub keep_temp: bool,
    /// echo: messages in flight per connection.
    #[arg(long, short = 'w', default_value_t = 1)]
    pub window: usize,
    /// rate: messages/s in total; fanout: says/s in total.
    #[arg(long, short = 'r')]
    pub rate: Option<f64>,
    /// fanout: members per room.
    #[arg(long, default_value_t = 10)]
    pub room_size: usize,
    /// hold: its own options (`--ping-interval`, `--connect-rate`, `--per-process`,
    /// `--settle`); churn takes `--settle` too.
    #[command(flatten)]
    #[serde(flatten)]
    pub hold: HoldOpts,
}

impl CompareOpts {
    /// The binary `--nginx-bin`, `--haproxy-bin` or `--caddy-bin` names, if given.
    fn peer_bin(&self, peer: Peer) -> Option<&std::path::Path> {
        match peer {
            Peer::Nginx => self.nginx_bin.as_deref(),
            Peer::Haproxy => self.haproxy_bin.as_deref(),
            Peer::Caddy => self.caddy_bin.as_deref(),
        }
    }

    /// Defaults for tests: direct and per-client with the built-in relay, one round.
    pub fn tiny(scenario: ScenarioKind) -> CompareOpts {
        CompareOpts {
            scenario,
            targets: vec![TargetKind::Direct, TargetKind::PerClient],
            rounds: 1,
            backends: 1,
            relay_bin: None,
            relay_builtin: true,
            relay_log: "warn".into(),
            nginx_bin: None,
            haproxy_bin: None,
            caddy_bin: None,
            mux_backend_bin: None,
            proxy_workers: None,
            keep_temp: false,
            window: 1,
            rate: None,
            room_size: 4,
            hold: HoldOpts {
                ping_interval: Duration::from_secs(1),
                settle: Duration::from_millis(200),
                ..HoldOpts::default()
            },
        }
    }

    /// The scenario options these flags make.
    pub fn scenario_opts(&self) -> ScenarioOpts {
        match self.scenario {
            ScenarioKind::Echo => ScenarioOpts::Echo(EchoOpts {
                window: self.window,
            }),
            ScenarioKind::Rate => ScenarioOpts::Rate(RateOpts {
                rate: self.rate.unwrap_or(1000.0),
                sweep: None,
                slo: Slo {
                    percentile: "p99".into(),
                    max_us: 10_000.0,
                },
                sweep_continue: false,
            }),
            ScenarioKind::Fanout => ScenarioOpts::Fanout(FanoutOpts {
                room_size: self.room_size,
                rate: self.rate.unwrap_or(200.0),
            }),
            ScenarioKind::Hold => ScenarioOpts::Hold(self.hold.clone()),
            ScenarioKind::Churn => ScenarioOpts::Churn(ChurnOpts {
                settle: self.hold.settle.max(Duration::from_secs(1)),
                max_cycles: 0,
            }),
        }
    }
}

/// A started target.
struct Live {
    kind: TargetKind,
    urls: Vec<String>,
    /// Processes to measure as the proxy.
    proxy: Vec<u32>,
    /// Processes to check are still alive before each run (proxy and its own backends).
    processes: Vec<ChildProcess>,
}

/// Where the harness's own executable is, for backends and hold workers.
#[derive(Debug, Clone)]
pub struct HarnessExe(pub PathBuf);

/// Runs `compare`.
pub async fn run(
    common: &CommonOpts,
    opts: &CompareOpts,
    exe: &HarnessExe,
    threads: usize,
) -> Result<RunReport> {
    common.validate().map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let started_unix_s = unix_now();
    let scenario = opts.scenario_opts();
    let temp = TempDir::new(opts.keep_temp).context("create a temp dir")?;
    let mut notes = Vec::new();
    let fanout = opts.scenario == ScenarioKind::Fanout;
    let kind = if fanout {
        BackendKind::Chat
    } else {
        BackendKind::Echo
    };

    let mut backends: Vec<Backend> = Vec::new();
    for i in 0..opts.backends.max(1) {
        backends.push(targets::start_backend(&exe.0, kind, i)?);
    }
    let backend_urls: Vec<String> = backends.iter().map(|b| b.url.clone()).collect();
    let backend_pids: Vec<u32> = backends.iter().map(|b| b.process.pid()).collect();

    let relay_bin = if opts.relay_builtin {
        RelayBin::Builtin(exe.0.clone())
    } else if let Some(path) = &opts.relay_bin {
        RelayBin::Binary(path.clone())
    } else {
        match targets::sibling("wsrelay") {
            Some(path) => RelayBin::Binary(path),
            None => anyhow::bail!(
                "no wsrelay binary beside {}: build it (cargo build --release -p wsrelay) or \
                 pass --relay-bin PATH (or --relay-builtin)",
                exe.0.display()
            ),
        }
    };
    let hash_key = if fanout { "query:room" } else { "remote_addr" };
    let workers = opts.proxy_workers;
    let mut extra = serde_json::Map::new();
    extra.insert("backend_urls".into(), backend_urls.clone().into());
    extra.insert("relay".into(), relay_bin.describe().into());
    extra.insert("relay_hash_key".into(), hash_key.into());
    extra.insert("loadgen_threads".into(), threads.into());
    extra.insert(
        "compare".into(),
        serde_json::to_value(opts).expect("options serialize"),
    );

    let mut live: Vec<Live> = Vec::new();
    let mut reports: Vec<(TargetKind, Option<TargetReport>)> = Vec::new();
    for &kind in &opts.targets {
        let started = match kind {
            TargetKind::Direct => Ok(Live {
                kind,
                urls: backend_urls.clone(),
                proxy: Vec::new(),
                processes: Vec::new(),
            }),
            TargetKind::PerClient => targets::start_relay(
                &relay_bin,
                &RelaySpec {
                    mode: RelayMode::PerClient,
                    backends: backend_urls.clone(),
                    hash_key: hash_key.into(),
                    max_message: common.size * 2,
                    reuse_port: false,
                },
                temp.path(),
                workers,
                &opts.relay_log,
            )
            .map(|relay| Live {
                kind,
                urls: vec![relay.url.clone()],
                proxy: vec![relay.process.pid()],
                processes: vec![relay.process],
            }),
            TargetKind::Mux => start_mux(common, opts, &relay_bin, &temp, fanout),
            TargetKind::Nginx | TargetKind::Haproxy | TargetKind::Caddy => {
                let peer = kind.peer().expect("a peer target");
                start_peer(peer, opts, &backend_urls, fanout, &temp).map(|proxy| {
                    extra.insert(peer.name().into(), proxy.version.clone().into());
                    Live {
                        kind,
                        urls: vec![proxy.url.clone()],
                        proxy: vec![proxy.process.pid()],
                        processes: vec![proxy.process],
                    }
                })
            }
        };
        match started {
            Ok(target) => {
                live.push(target);
                reports.push((kind, None));
            }
            Err(StartError::Unsupported(reason)) => {
                notes.push(format!("{}: skipped: {reason}", kind.name()));
                reports.push((
                    kind,
                    Some(TargetReport::not_run(
                        kind.name(),
                        format!("skipped: {reason}"),
                    )),
                ));
            }
            Err(error) => return Err(error.into()),
        }
    }

    let launcher = WorkerLauncher { exe: exe.0.clone() };
    let mut measured: Vec<Vec<Measurement>> = live.iter().map(|_| Vec::new()).collect();
    let mut failures: Vec<Option<String>> = live.iter().map(|_| None).collect();
    let rounds = opts.rounds.max(1);
    for round in 0..rounds {
        for step in 0..live.len() {
            let i = (step + round) % live.len();
            if failures[i].is_some() {
                continue;
            }
            if let Some(exit) = live[i].processes.iter_mut().find_map(ChildProcess::exited) {
                failures[i] = Some(format!("failed: {exit}"));
                continue;
            }
            let target = &live[i];
            let run_target = RunTarget {
                label: target.kind.name().into(),
                connector: connector(common, &target.urls).await?,
                watched: Watched {
                    proxy: ProcessGroup::new(target.proxy.clone()),
                    backend: ProcessGroup::new(if target.kind == TargetKind::Mux {
                        target
                            .processes
                            .iter()
                            .skip(1)
                            .map(ChildProcess::pid)
                            .collect()
                    } else {
                        backend_pids.clone()
                    }),
                },
                show_progress: !common.no_progress,
            };
            let mut run_target = run_target;
            if rounds > 1 {
                run_target.label = format!("{} {}/{rounds}", target.kind.name(), round + 1);
            }
            let mut m = run_scenario(&scenario, common, &run_target, Some(&launcher)).await?;
            m.label = target.kind.name().into();
            if !common.no_progress {
                eprintln!(
                    "{}",
                    report::table::headline(&TargetReport::measured(
                        &m,
                        Vec::new(),
                        scenario.unit()
                    ))
                );
            }
            measured[i].push(m);
        }
    }

    let mut measured_reports = Vec::new();
    for (i, target) in live.iter_mut().enumerate() {
        let rounds_of = std::mem::take(&mut measured[i]);
        let report = if let Some(reason) = failures[i].take() {
            TargetReport::not_run(target.kind.name(), reason)
        } else if let Some(first) = rounds_of.first() {
            let mut merged = first.clone();
            for m in &rounds_of[1..] {
                merged.merge(m);
            }
            let figures = rounds_of.iter().map(RoundFigures::of).collect();
            let mut r = TargetReport::measured(&merged, figures, scenario.unit());
            r.url = target.urls.join(" ");
            r
        } else {
            TargetReport::not_run(target.kind.name(), "failed: never ran".into())
        };
        measured_reports.push((target.kind, report));
    }
    let mut ordered = Vec::new();
    for (kind, skipped) in reports {
        match skipped {
            Some(report) => ordered.push(report),
            None => {
                let index = measured_reports
                    .iter()
                    .position(|(k, _)| *k == kind)
                    .expect("every live target has a report");
                ordered.push(measured_reports.remove(index).1);
            }
        }
    }
    let best_peer = report::fill_ratios(&mut ordered);
    // Stop everything before reporting (Drop would too).
    drop(live);
    drop(backends);

    let errors_total = ordered.iter().map(|t| t.errors).sum();
    let mut report = RunReport {
        scenario: scenario.name().into(),
        config: config_json(common, &scenario, extra),
        errors_total,
        mode: "compare".into(),
        machine: MachineInfo::read(),
        loadgen_threads: threads,
        started_unix_s,
        wall_s: started.elapsed().as_secs_f64(),
        notes,
        best_peer,
        targets: ordered,
    };
    if let Some(cfg) = report.config.as_object_mut() {
        cfg.insert("rounds".into(), rounds.into());
    }
    report.notes.extend(report::saturation_notes(&report));
    if opts.proxy_workers.is_none() {
        report.notes.push(format!(
            "the relay ran with its default worker threads ({} here), the peer proxies with one \
             each (nginx worker_processes 1, HAProxy nbthread 1, Caddy GOMAXPROCS=1)",
            report.machine.cpus
        ));
    }
    Ok(report)
}

/// Starts a peer proxy in front of the backends, hashing as the relay does (`remote_addr`, or
/// the room for fanout), with `--proxy-workers` workers (1 by default); `Unsupported` when it
/// is not installed.
fn start_peer(
    peer: Peer,
    opts: &CompareOpts,
    backends: &[String],
    fanout: bool,
    temp: &TempDir,
) -> Result<PeerProxy, StartError> {
    let bin = peer
        .find(opts.peer_bin(peer))
        .ok_or_else(|| StartError::Unsupported(peer.missing()))?;
    let hash = if fanout {
        PeerHash::RoomParameter
    } else {
        PeerHash::ClientAddress
    };
    targets::start_peer(
        peer,
        &bin,
        backends,
        hash,
        temp.path(),
        opts.proxy_workers.unwrap_or(1),
    )
}

/// Starts the mux target: checks the relay accepts a mux config first, then finds and starts
/// the mux echo backends.
fn start_mux(
    common: &CommonOpts,
    opts: &CompareOpts,
    relay_bin: &RelayBin,
    temp: &TempDir,
    fanout: bool,
) -> Result<Live, StartError> {
    if fanout {
        return Err(StartError::Unsupported(
            "the mux echo backend has no chat rooms".into(),
        ));
    }
    let probe = RelaySpec {
        mode: RelayMode::Mux,
        backends: vec!["ws://127.0.0.1:9/".into()],
        hash_key: "remote_addr".into(),
        max_message: common.size * 2,
        reuse_port: false,
    };
    let probe_path = temp.path().join("mux-check.toml");
    std::fs::write(&probe_path, targets::relay_config(&probe, 9)).map_err(|e| {
        StartError::Failed {
            what: "write mux config".into(),
            reason: e.to_string(),
        }
    })?;
    targets::check_relay_config(relay_bin, &probe_path)?;
    let bin = opts
        .mux_backend_bin
        .clone()
        .or_else(|| targets::sibling("examples/mux_echo_backend"))
        .ok_or_else(|| {
            StartError::Unsupported(
                "the mux echo backend is not built (cargo build --release -p wsrelay-client \
                 --example mux_echo_backend)"
                    .into(),
            )
        })?;
    let mut processes = Vec::new();
    let mut urls = Vec::new();
    for i in 0..opts.backends.max(1) {
        let backend = targets::start_mux_backend(&bin, i)?;
        urls.push(backend.url.clone());
        processes.push(backend.process);
    }
    let relay = targets::start_relay(
        relay_bin,
        &RelaySpec {
            mode: RelayMode::Mux,
            backends: urls,
            hash_key: "remote_addr".into(),
            max_message: common.size * 2,
            reuse_port: false,
        },
        temp.path(),
        opts.proxy_workers,
        &opts.relay_log,
    )?;
    let proxy = vec![relay.process.pid()];
    let url = relay.url.clone();
    processes.insert(0, relay.process);
    Ok(Live {
        kind: TargetKind::Mux,
        urls: vec![url],
        proxy,
        processes,
    })
}
