//! `soak`: hours of realistic trouble against a real relay process. `--connections` clients
//! (half on a per-client route, half on a mux route, by default) send numbered messages through
//! a `wsrelay` process to echo backends in processes of their own, leave and come back (churn),
//! while backends are killed with SIGKILL at random and restarted on their port.
//!
//! Every echo is checked end to end ([`ledger`]): zero lost, zero out of order, nothing that
//! was never sent, duplicates only after a backend died (the relay's replay to the next backend
//! may repeat what the dead one had already answered), and no connection closed by the relay
//! (the routes say `on_backend_loss = "reconnect"`). The relay's RSS and open files are read
//! from `/proc/PID/` before the clients come, throughout (the peak), and after they leave; they
//! must come back near the baseline. Any broken invariant fails the run.
//!
//! Limits of one machine: every process may hold 20,000 files. The harness holds one socket per
//! client, the relay two per per-client client and one per mux client, so 10,000 clients half
//! on each route need ~15,000 in the relay. Clients are spread over loopback source addresses
//! (one per 5,000), which leaves room for the ports in TIME_WAIT the churn leaves behind.

pub mod client;
pub mod faults;
pub mod ledger;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use self::client::{Route, Shared, Tally};
use self::faults::{FaultCounts, FaultPlan, Fleet, Injector, KillTargets};
use self::ledger::{Counts, Tolerance, Usage, UsageFigures};
use crate::backend::BackendKind;
use crate::conn::{self, Connector, TargetUrl};
use crate::procstat;
use crate::stats::{ErrorKind, ErrorLog};
use crate::targets::{Programs, RelayLaunch, TempDir};
use crate::units::{parse_duration, parse_size, ser_duration, thousands};

/// Options of `soak`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct SoakOpts {
    /// Clients in all.
    #[arg(long = "connections", short = 'c', default_value_t = 10_000)]
    pub connections: usize,
    /// How long the load runs, ramp included ("30m", "2h").
    #[arg(long, short = 'd', default_value = "30m", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub duration: Duration,
    /// Clients start evenly over this time.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub ramp: Duration,
    /// Share of the clients on the mux route (the rest on the per-client route).
    #[arg(long, default_value_t = 0.5)]
    pub mux_share: f64,
    /// Echo backends of the per-client route.
    #[arg(long, default_value_t = 3)]
    pub per_client_backends: usize,
    /// Mux echo backends of the mux route.
    #[arg(long, default_value_t = 3)]
    pub mux_backends: usize,
    /// Each client sends one message this often.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub interval: Duration,
    /// Messages in flight per client at most (a tick with a full window is skipped).
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    /// Message size (at least the 16-byte header).
    #[arg(long, default_value = "64", value_parser = parse_size)]
    pub size: usize,
    /// Mean time a client stays connected before leaving ("0s": never leave).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub lifetime: Duration,
    /// Longest pause before a client that left comes back.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub away: Duration,
    /// Mean time between backend kills (SIGKILL; "0s": none); at least 2 s after a restart,
    /// the time the relay's health checks need to take the backend back.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub kill_every: Duration,
    /// Which backends are killed.
    #[arg(long, value_enum, default_value = "all")]
    pub kill_backends: KillTargets,
    /// How long a killed backend stays down before it is restarted on its port.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub down_for: Duration,
    /// How long a leaving client waits for its messages in flight.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub drain_timeout: Duration,
    /// How long to wait, after the clients left, for the relay's files and memory to come
    /// back near the baseline.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub settle: Duration,
    /// Relay open files above the baseline still accepted after the clients left.
    #[arg(long, default_value_t = 64)]
    pub fd_slack: u64,
    /// Share of the relay's RSS growth (peak - baseline) its allocator may keep afterwards.
    #[arg(long, default_value_t = 0.25)]
    pub rss_share: f64,
    /// RSS above the baseline always accepted afterwards.
    #[arg(long, default_value = "32MiB", value_parser = parse_size)]
    pub rss_slack: usize,
    /// Loopback source addresses for the clients (0: one per 5,000 clients).
    #[arg(long, default_value_t = 0)]
    pub source_addrs: usize,
    /// The relay binary (default: `wsrelay` beside this executable).
    #[arg(long, value_name = "PATH")]
    pub relay_bin: Option<PathBuf>,
    /// Run the relay library compiled into this harness instead of the `wsrelay` binary.
    #[arg(long)]
    pub relay_builtin: bool,
    /// Seed of every random choice (default: from the clock; the report shows it).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print a progress line this often to stderr ("0s": never).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub progress_every: Duration,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// `RUST_LOG` of the relay (its log is in the temp directory; see --keep-files).
    #[arg(long, default_value = "warn")]
    pub relay_log: String,
    /// Keep the relay's config and log (in the temp directory the report names).
    #[arg(long)]
    pub keep_files: bool,
}

impl SoakOpts {
    /// A small run for tests: 40 clients for 8 s, a per-client backend killed every second or
    /// so. (Killing mux backends currently breaks the mux route's invariants: see
    /// docs/testing.md.)
    pub fn tiny() -> SoakOpts {
        SoakOpts {
            connections: 40,
            duration: Duration::from_secs(8),
            ramp: Duration::from_secs(1),
            mux_share: 0.5,
            per_client_backends: 3,
            mux_backends: 2,
            interval: Duration::from_millis(50),
            window: 4,
            size: 64,
            lifetime: Duration::from_secs(2),
            away: Duration::from_millis(300),
            kill_every: Duration::from_secs(2),
            down_for: Duration::from_millis(500),
            kill_backends: KillTargets::PerClient,
            drain_timeout: Duration::from_secs(10),
            settle: Duration::from_secs(30),
            fd_slack: 64,
            rss_share: 0.25,
            rss_slack: 32 << 20,
            source_addrs: 0,
            relay_bin: None,
            relay_builtin: false,
            seed: Some(1),
            progress_every: Duration::ZERO,
            json: None,
            relay_log: "warn".into(),
            keep_files: false,
        }
    }

    /// Checks what no parser can.
    pub fn validate(&self) -> Result<(), String> {
        if self.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        if self.size < ledger::HEADER_LEN {
            return Err(format!(
                "--size {} is below the {}-byte header of a soak message",
                self.size,
                ledger::HEADER_LEN
            ));
        }
        if !(0.0..=1.0).contains(&self.mux_share) {
            return Err(format!(
                "--mux-share {} must be within 0..=1",
                self.mux_share
            ));
        }
        let (mux, per_client) = self.split();
        if (per_client > 0 && self.per_client_backends < 2) || (mux > 0 && self.mux_backends < 2) {
            return Err(
                "each route needs at least 2 backends, so a killed one always has a successor"
                    .into(),
            );
        }
        if self.window == 0 || self.interval.is_zero() {
            return Err("--window and --interval must be above 0".into());
        }
        if self.ramp >= self.duration {
            return Err(format!(
                "--ramp {:?} must be shorter than --duration {:?}",
                self.ramp, self.duration
            ));
        }
        if !(0.0..=1.0).contains(&self.rss_share) {
            return Err(format!(
                "--rss-share {} must be within 0..=1",
                self.rss_share
            ));
        }
        Ok(())
    }

    /// Clients on the mux route and on the per-client route.
    pub fn split(&self) -> (usize, usize) {
        let mux = ((self.connections as f64) * self.mux_share).round() as usize;
        (mux, self.connections - mux)
    }

    fn tolerance(&self) -> Tolerance {
        Tolerance {
            fds: self.fd_slack,
            rss_share: self.rss_share,
            rss_kib: self.rss_slack as u64 / 1024,
        }
    }
}

/// Everything a soak run found.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// `"pass"` or `"fail"`.
    pub status: &'static str,
    /// The invariants the run broke, in words.
    pub broken: Vec<String>,
    /// The options of the run.
    pub config: SoakOpts,
    /// The seed used.
    pub seed: u64,
    /// The relay that was run.
    pub relay: String,
    /// Seconds the load ran.
    pub elapsed_s: f64,
    /// The message counts the invariants are judged on.
    pub counts: Counts,
    /// Connections and their churn.
    pub connections: ConnectionCounts,
    /// Connections ended by someone else, by kind.
    pub unexpected_closes: BTreeMap<String, ErrorKind>,
    /// Failed connects, lost messages and broken sequences, by kind, with a first example.
    pub problems: BTreeMap<String, ErrorKind>,
    /// What the fault injector did.
    pub faults: FaultCounts,
    /// The relay's memory and open files.
    pub relay_usage: UsageFigures,
    /// The highest `after` figures still accepted.
    pub tolerance: Tolerance,
    /// Where the relay's config and log are (kept with `--keep-files`).
    pub files: PathBuf,
}

impl SoakReport {
    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.broken.is_empty()
    }
}

/// How the clients connected.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ConnectionCounts {
    /// Clients on the per-client route.
    pub per_client: usize,
    /// Clients on the mux route.
    pub mux: usize,
    /// Clients that connected at least once.
    pub clients_seen: u64,
    /// Connections opened.
    pub opened: u64,
    /// Connection attempts that failed.
    pub failed: u64,
    /// Times a client left by itself (the churn).
    pub left: u64,
    /// Connections opened again after an unexpected close.
    pub reconnections: u64,
    /// Most connections open at once.
    pub peak_open: u64,
    /// Ticks skipped because a client's window was full.
    pub held_back: u64,
}

/// Errors that stop a soak before it can judge anything.
#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    /// Bad options.
    #[error("{0}")]
    Options(String),
    /// A process could not be started.
    #[error(transparent)]
    Start(#[from] crate::targets::StartError),
    /// A target URL was refused.
    #[error(transparent)]
    Target(#[from] crate::conn::TargetError),
    /// The temp directory could not be made.
    #[error("create a temp directory: {0}")]
    TempDir(std::io::Error),
}

/// The relay's config: a per-client route `/pc` and a mux route `/mux`, both hashing on the
/// client's `?client=` and moving clients of a lost backend to the next one; active health
/// checks every second, so a restarted backend is back in the ranking quickly.
pub fn relay_config(port: u16, per_client: &[String], mux: &[String]) -> String {
    let list = |urls: &[String]| {
        urls.iter()
            .map(|u| format!("{u:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let health = "health_check = { interval = \"1s\", timeout = \"1s\", unhealthy_after = 1, healthy_after = 1 }";
    format!(
        "# written by wsrelay-loadtest soak\n\
         [server]\nlisten = \"127.0.0.1:{port}\"\nmax_connections = 200000\n\
         handshake_timeout = \"10s\"\nshutdown_grace = \"2s\"\n\n\
         [[route]]\npath = \"/pc\"\nupstream = \"pc\"\nmode = \"per-client\"\nhash_key = \"query:client\"\n\n\
         [[route]]\npath = \"/mux\"\nupstream = \"mx\"\nmode = \"mux\"\nhash_key = \"query:client\"\n\n\
         [upstream.pc]\nbackends = [{}]\nconnect_timeout = \"2s\"\non_backend_loss = \"reconnect\"\n{health}\n\n\
         [upstream.mx]\nbackends = [{}]\nconnect_timeout = \"2s\"\non_backend_loss = \"reconnect\"\nmux_links = 2\n{health}\n",
        list(per_client),
        list(mux)
    )
}

/// Runs the soak: starts the backends and the relay, the clients and the faults, judges the
/// run, and stops everything it started.
pub async fn run(opts: &SoakOpts, programs: &Programs) -> Result<SoakReport, SoakError> {
    opts.validate().map_err(SoakError::Options)?;
    let seed = opts.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let dir = TempDir::new(opts.keep_files).map_err(SoakError::TempDir)?;
    let fleet = Fleet::start(
        &programs.harness,
        opts.per_client_backends,
        opts.mux_backends,
        seed,
    )?;
    let port = crate::targets::free_port().map_err(|e| crate::targets::StartError::Failed {
        what: "pick a relay port".into(),
        reason: e.to_string(),
    })?;
    let launch = RelayLaunch {
        name: "relay-soak",
        config: relay_config(
            port,
            &fleet.urls(BackendKind::Echo),
            &fleet.urls(BackendKind::MuxEcho),
        ),
        port,
        workers: None,
        log: &opts.relay_log,
    };
    let mut relay = launch.start(&programs.relay, dir.path())?;
    let relay_pid = relay.process.pid();
    let connectors = Connectors::new(opts, &relay.url).await?;

    // The mux links and first health checks settle before the baseline is read.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline = usage_of(relay_pid);
    let (stop_sampler, sampler) = Sampler::start(relay_pid);

    let shared = Arc::new(Shared {
        interval: opts.interval,
        window: opts.window,
        size: opts.size,
        lifetime: opts.lifetime,
        away: opts.away,
        drain_timeout: opts.drain_timeout,
        tally: Tally::default(),
        unexpected: ErrorLog::default(),
        problems: ErrorLog::default(),
    });
    let injector = Injector::start(
        fleet,
        FaultPlan {
            every: opts.kill_every,
            down_for: opts.down_for,
            targets: opts.kill_backends,
            seed,
        },
    );
    let started = Instant::now();
    let (stop_clients, stopping) = watch::channel(false);
    let mut clients = JoinSet::new();
    for id in 0..opts.connections {
        let at = started + opts.ramp.mul_f64(id as f64 / opts.connections as f64);
        clients.spawn(client::run(
            id as u32,
            connectors.for_client(id, opts),
            shared.clone(),
            at,
            stopping.clone(),
        ));
    }
    let progress = Progress::start(opts.progress_every, shared.clone(), relay_pid, started);
    tokio::time::sleep_until(started + opts.duration).await;

    // Faults end first (every backend running again), then the clients leave.
    let (injector, faults) = tokio::task::spawn_blocking(move || {
        let mut injector = injector;
        let faults = injector.stop();
        (injector, faults)
    })
    .await
    .expect("the injector's stop does not panic");
    let elapsed_s = started.elapsed().as_secs_f64();
    let _ = stop_clients.send(true);
    let leave_by = Instant::now() + opts.drain_timeout + Duration::from_secs(15);
    while let Ok(Some(_)) = tokio::time::timeout_at(leave_by, clients.join_next()).await {}
    let stragglers = clients.len();
    clients.shutdown().await;
    drop(progress);
    let _ = stop_sampler.send(true);
    let peak = sampler.await.unwrap_or_default();

    let tolerance = opts.tolerance();
    let after = settle(relay_pid, baseline, peak, &tolerance, opts.settle).await;
    let relay_usage = UsageFigures {
        baseline,
        peak,
        after,
    };
    let counts = shared.tally.counts();
    let mut broken = ledger::broken_invariants(&counts, faults.kills(), &relay_usage, &tolerance);
    if let Some(exit) = relay.process.exited() {
        broken.insert(0, format!("the relay died: {exit}"));
    }
    if stragglers > 0 {
        broken.push(format!(
            "{stragglers} clients had not left {:?} after the end of the load",
            opts.drain_timeout + Duration::from_secs(15)
        ));
    }
    if faults.restart_failures > 0 {
        broken.push(format!(
            "{} backend restarts failed (see stderr)",
            faults.restart_failures
        ));
    }
    // Stops every backend (waiting for each to exit), off the runtime's threads.
    let _ = tokio::task::spawn_blocking(move || drop(injector)).await;
    let (mux, per_client) = opts.split();
    let tally = &shared.tally;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    Ok(SoakReport {
        status: if broken.is_empty() { "pass" } else { "fail" },
        broken,
        config: opts.clone(),
        seed,
        relay: programs.relay.describe(),
        elapsed_s,
        counts,
        connections: ConnectionCounts {
            per_client,
            mux,
            clients_seen: get(&tally.clients_seen),
            opened: get(&tally.connects),
            failed: get(&tally.failed_connects),
            left: get(&tally.left),
            reconnections: get(&tally.reconnections),
            peak_open: get(&tally.peak_open),
            held_back: get(&tally.held_back),
        },
        unexpected_closes: shared.unexpected.snapshot(),
        problems: shared.problems.snapshot(),
        faults,
        relay_usage,
        tolerance,
        files: dir.path().to_owned(),
    })
}

/// The connectors of the two routes, sharing the source addresses.
struct Connectors {
    per_client: Arc<Connector>,
    mux: Arc<Connector>,
    mux_clients: usize,
}

impl Connectors {
    async fn new(opts: &SoakOpts, relay_url: &str) -> Result<Connectors, SoakError> {
        let sources = match opts.source_addrs {
            0 => opts.connections.div_ceil(5_000).max(1),
            n => n,
        };
        let sources = conn::loopback_sources(sources, 1);
        let base = relay_url.trim_end_matches('/');
        let connector = |target| {
            Arc::new(Connector::new(
                vec![target],
                sources.clone(),
                Duration::from_secs(10),
            ))
        };
        Ok(Connectors {
            per_client: connector(TargetUrl::resolve(&format!("{base}/pc"), false).await?),
            mux: connector(TargetUrl::resolve(&format!("{base}/mux"), false).await?),
            mux_clients: opts.split().0,
        })
    }

    /// Client `id`'s route: mux clients are spread evenly among the others.
    fn for_client(&self, id: usize, opts: &SoakOpts) -> Route {
        let mux_before = |n: usize| (n * self.mux_clients).div_ceil(opts.connections);
        if mux_before(id + 1) > mux_before(id) {
            Route {
                name: "mux",
                connector: self.mux.clone(),
            }
        } else {
            Route {
                name: "per-client",
                connector: self.per_client.clone(),
            }
        }
    }
}

/// The relay's RSS and open files now (zeros once it is gone).
fn usage_of(pid: u32) -> Usage {
    Usage {
        rss_kib: procstat::rss_kib(pid).unwrap_or(0),
        fds: procstat::open_fds(pid).unwrap_or(0),
    }
}

/// Reads the relay every half second and keeps the highest figures.
struct Sampler;

impl Sampler {
    fn start(pid: u32) -> (watch::Sender<bool>, tokio::task::JoinHandle<Usage>) {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut peak = Usage::default();
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let now = usage_of(pid);
                        peak.rss_kib = peak.rss_kib.max(now.rss_kib);
                        peak.fds = peak.fds.max(now.fds);
                    }
                    _ = stopped.changed() => return peak,
                }
            }
        });
        (stop, task)
    }
}

/// Waits up to `longest` for the relay to come back near `baseline`; its usage at the end.
async fn settle(
    pid: u32,
    baseline: Usage,
    peak: Usage,
    tolerance: &Tolerance,
    longest: Duration,
) -> Usage {
    let until = Instant::now() + longest;
    loop {
        let after = usage_of(pid);
        let figures = UsageFigures {
            baseline,
            peak,
            after,
        };
        if tolerance.returned(&figures) || Instant::now() >= until {
            return after;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Prints a line of figures to stderr every so often while the soak runs; stops when dropped.
struct Progress(Option<tokio::task::JoinHandle<()>>);

impl Progress {
    fn start(every: Duration, shared: Arc<Shared>, pid: u32, started: Instant) -> Progress {
        if every.is_zero() {
            return Progress(None);
        }
        Progress(Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(started + every, every);
            loop {
                tick.tick().await;
                let c = shared.tally.counts();
                let u = usage_of(pid);
                eprintln!(
                    "soak {:>6.0}s: open {} sent {} echoed {} lost {} out-of-order {} duplicates {} \
                     unexpected closes {} | relay RSS {} MiB, {} files",
                    started.elapsed().as_secs_f64(),
                    shared.tally.open.load(Ordering::Relaxed),
                    c.sent,
                    c.echoed,
                    c.lost,
                    c.out_of_order,
                    c.duplicates,
                    c.unexpected_closes,
                    u.rss_kib / 1024,
                    u.fds
                );
            }
        })))
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// The report as text: the verdict first, then the figures.
pub fn render(report: &SoakReport) -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    let verdict = if report.passed() { "PASS" } else { "FAIL" };
    line(format!(
        "soak: {verdict} after {:.0}s (seed {})",
        report.elapsed_s, report.seed
    ));
    for broken in &report.broken {
        line(format!("  broken: {broken}"));
    }
    let o = &report.config;
    let k = &report.connections;
    line(format!(
        "clients     {} ({} per-client, {} mux), {} + {} backends, a message every {:?} per client",
        thousands(o.connections as u64),
        thousands(k.per_client as u64),
        thousands(k.mux as u64),
        o.per_client_backends,
        o.mux_backends,
        o.interval
    ));
    line(format!(
        "connections opened {}, failed {}, left and came back {}, reconnected after an unexpected close {}, most open at once {}",
        thousands(k.opened),
        thousands(k.failed),
        thousands(k.left),
        thousands(k.reconnections),
        thousands(k.peak_open)
    ));
    let c = &report.counts;
    line(format!(
        "messages    sent {}, echoed {}, lost {}, out of order {}, duplicates {}, corrupt {}, held back (window full) {}",
        thousands(c.sent),
        thousands(c.echoed),
        thousands(c.lost),
        thousands(c.out_of_order),
        thousands(c.duplicates),
        thousands(c.corrupt),
        thousands(k.held_back)
    ));
    line(format!(
        "unexpected closes {}{}",
        thousands(c.unexpected_closes),
        kinds(&report.unexpected_closes)
    ));
    let f = &report.faults;
    line(format!(
        "faults      backends killed {} ({} per-client, {} mux), restarted {}, restarts failed {}",
        f.kills(),
        f.per_client_kills,
        f.mux_kills,
        f.restarts,
        f.restart_failures
    ));
    let u = &report.relay_usage;
    let mib = |kib: u64| kib as f64 / 1024.0;
    line(format!(
        "relay RSS   baseline {:.1} MiB, peak {:.1} MiB, after {:.1} MiB (limit {:.1} MiB)",
        mib(u.baseline.rss_kib),
        mib(u.peak.rss_kib),
        mib(u.after.rss_kib),
        mib(report.tolerance.rss_limit(u))
    ));
    line(format!(
        "relay files baseline {}, peak {}, after {} (limit {})",
        u.baseline.fds,
        u.peak.fds,
        u.after.fds,
        u.baseline.fds + report.tolerance.fds
    ));
    if !report.problems.is_empty() {
        line(format!("problems{}", kinds(&report.problems)));
    }
    out
}

fn kinds(map: &BTreeMap<String, ErrorKind>) -> String {
    map.iter()
        .map(|(kind, e)| format!("\n  {kind}: {} (first: {})", thousands(e.count), e.example))
        .collect()
}
