//! The `wsrelay-loadtest` command: a thin CLI over the `wsrelay_loadtest` library.
//!
//! Exit status: 0 when the run had no errors, 2 when it finished with errors or (soak, scale)
//! broke an invariant (the figures are still printed and written), 1 when the harness itself failed, 130 on Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use wsrelay_loadtest::backend::{self, BackendKind};
use wsrelay_loadtest::compare::{self, CompareOpts, HarnessExe};
use wsrelay_loadtest::procstat;
use wsrelay_loadtest::report::{self, RunReport};
use wsrelay_loadtest::run::{self, ScenarioOpts};
use wsrelay_loadtest::scenario::CommonOpts;
use wsrelay_loadtest::scenario::churn::ChurnOpts;
use wsrelay_loadtest::scenario::echo::EchoOpts;
use wsrelay_loadtest::scenario::fanout::FanoutOpts;
use wsrelay_loadtest::scenario::hold::HoldOpts;
use wsrelay_loadtest::scenario::rate::RateOpts;
use wsrelay_loadtest::scenario::scale::{self, ScaleOpts};
use wsrelay_loadtest::scenario::soak::{self, SoakOpts};
use wsrelay_loadtest::targets::{self, Programs};
use wsrelay_loadtest::worker::{self, WorkerLauncher};

/// Load tests for WebSocket servers and proxies, wsrelay first: closed and open loop echo,
/// chat fanout, idle connection holding, connection churn, and side-by-side comparisons of
/// direct backends, wsrelay, nginx, HAProxy and Caddy.
#[derive(Debug, Parser)]
#[command(name = "wsrelay-loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where a single-target scenario sends its load.
#[derive(Debug, clap::Args)]
struct Targets {
    /// ws:// URL to load (repeat to spread connections round-robin over several).
    #[arg(long = "target", short = 't', value_name = "URL", required = true)]
    urls: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Closed loop: each connection keeps --window messages in flight; throughput and
    /// round-trip latency.
    Echo {
        #[command(flatten)]
        targets: Targets,
        #[command(flatten)]
        common: CommonOpts,
        #[command(flatten)]
        opts: EchoOpts,
    },
    /// Open loop at --rate messages/s; latency from the intended send time (coordinated
    /// omission corrected); --sweep finds the highest rate within --slo.
    Rate {
        #[command(flatten)]
        targets: Targets,
        #[command(flatten)]
        common: CommonOpts,
        #[command(flatten)]
        opts: RateOpts,
    },
    /// Chat rooms of --room-size (join/say/said protocol); delivery latency to every member.
    Fanout {
        #[command(flatten)]
        targets: Targets,
        #[command(flatten)]
        common: CommonOpts,
        #[command(flatten)]
        opts: FanoutOpts,
    },
    /// Open --connections idle connections, hold them --duration with keepalive; connect rate,
    /// failures, memory per connection of --watch-pid.
    Hold {
        #[command(flatten)]
        targets: Targets,
        #[command(flatten)]
        common: CommonOpts,
        #[command(flatten)]
        opts: HoldOpts,
    },
    /// Connect, exchange one message, close, in --connections loops; connections/s and the
    /// watched process's memory before and after.
    Churn {
        #[command(flatten)]
        targets: Targets,
        #[command(flatten)]
        common: CommonOpts,
        #[command(flatten)]
        opts: ChurnOpts,
    },
    /// Hours of churn and backend crashes against a wsrelay process: every message checked
    /// end to end, the relay's memory and files back near the baseline afterwards.
    Soak {
        #[command(flatten)]
        opts: SoakOpts,
    },
    /// 100,000 idle mux clients through 6 relay processes sharing one port (reuse_port), held
    /// with keepalive; no drops, and every key on one backend as the backends saw it.
    Scale {
        #[command(flatten)]
        opts: ScaleOpts,
    },
    /// Start backends, wsrelay (per-client, mux), nginx, HAProxy and Caddy on loopback and run
    /// one scenario against each, alternating, side by side.
    Compare {
        #[command(flatten)]
        common: CommonOpts,
        #[command(flatten)]
        opts: CompareOpts,
    },
    /// Run a backend of the harness: an echo server or the chat-room server.
    Serve {
        /// Which server.
        #[arg(value_enum)]
        kind: BackendKind,
        /// Address to listen on (port 0: any free port; the address is printed).
        #[arg(long, default_value = "127.0.0.1:9001")]
        listen: SocketAddr,
    },
    /// Internal: one worker process of a big `hold` run.
    #[command(hide = true)]
    HoldWorker {
        /// The worker's share, as JSON.
        #[arg(long)]
        spec: String,
    },
    /// Internal: a recording mux backend of a `scale` run.
    #[command(hide = true)]
    ScaleBackend {
        /// Address to listen on (port 0: any free port; the address is printed).
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Internal: the relay library compiled into the harness (`compare --relay-builtin`).
    #[command(hide = true)]
    ServeRelay {
        /// Relay config file.
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    procstat::raise_fd_limit();
    match cli.command {
        Command::Serve { kind, listen } => finish(
            runtime(None).and_then(|rt| Ok(rt.block_on(backend::serve_forever(kind, listen))?)),
        ),
        Command::HoldWorker { spec } => finish(runtime(None).and_then(|rt| {
            let spec = serde_json::from_str(&spec).context("parse the worker spec")?;
            rt.block_on(worker::worker_main(spec))
        })),
        Command::ScaleBackend { listen } => {
            finish(runtime(None).and_then(|rt| Ok(rt.block_on(scale::recorder::serve(listen))?)))
        }
        Command::ServeRelay { config } => {
            finish(runtime(None).and_then(|rt| rt.block_on(serve_relay(config))))
        }
        Command::Echo {
            targets,
            common,
            opts,
        } => single(common, ScenarioOpts::Echo(opts), targets.urls),
        Command::Rate {
            targets,
            common,
            opts,
        } => single(common, ScenarioOpts::Rate(opts), targets.urls),
        Command::Fanout {
            targets,
            common,
            opts,
        } => single(common, ScenarioOpts::Fanout(opts), targets.urls),
        Command::Hold {
            targets,
            common,
            opts,
        } => single(common, ScenarioOpts::Hold(opts), targets.urls),
        Command::Churn {
            targets,
            common,
            opts,
        } => single(common, ScenarioOpts::Churn(opts), targets.urls),
        Command::Soak { opts } => {
            let outcome = with_programs(opts.relay_bin.as_deref(), opts.relay_builtin, {
                let opts = opts.clone();
                async move |programs: Programs| Ok(soak::run(&opts, &programs).await?)
            });
            conclude_verdict(outcome, opts.json.as_deref(), soak::render, |r| r.passed())
        }
        Command::Scale { opts } => {
            let outcome = with_programs(opts.relay_bin.as_deref(), opts.relay_builtin, {
                let opts = opts.clone();
                async move |programs: Programs| Ok(scale::run(&opts, &programs).await?)
            });
            let render = scale::report::render;
            conclude_verdict(outcome, opts.json.as_deref(), render, |r| r.passed())
        }
        Command::Compare { common, opts } => {
            let threads = threads(&common);
            let exe = match std::env::current_exe() {
                Ok(exe) => HarnessExe(exe),
                Err(error) => return fail(anyhow::anyhow!("find my own executable: {error}")),
            };
            let outcome = runtime(common.client_threads).and_then(|rt| {
                rt.block_on(interruptible(compare::run(&common, &opts, &exe, threads)))
            });
            conclude(&common, outcome)
        }
    }
}

/// Runs `work` (a run that starts its own relay and backends) with the programs it needs,
/// unless Ctrl-C comes first.
fn with_programs<T>(
    relay_bin: Option<&Path>,
    builtin: bool,
    work: impl AsyncFnOnce(Programs) -> Result<T>,
) -> Result<Option<T>> {
    let exe = std::env::current_exe().context("find my own executable")?;
    let programs = targets::programs(&exe, relay_bin, builtin).map_err(anyhow::Error::msg)?;
    runtime(None)?.block_on(interruptible(work(programs)))
}

/// Prints a judged run's report, writes its JSON, and exits 0 if it passed, 2 if it broke an
/// invariant.
fn conclude_verdict<R: serde::Serialize>(
    outcome: Result<Option<R>>,
    json: Option<&Path>,
    render: impl Fn(&R) -> String,
    passed: impl Fn(&R) -> bool,
) -> ExitCode {
    let report = match outcome {
        Ok(Some(report)) => report,
        Ok(None) => return ExitCode::from(130),
        Err(error) => return fail(error),
    };
    print!("{}", render(&report));
    if let Some(path) = json {
        let written = serde_json::to_vec_pretty(&report)
            .map_err(anyhow::Error::from)
            .and_then(|json| Ok(std::fs::write(path, json)?));
        if let Err(error) = written {
            return fail(error.context(format!("write {}", path.display())));
        }
        eprintln!("JSON written to {}", path.display());
    }
    if passed(&report) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

fn threads(common: &CommonOpts) -> usize {
    common
        .client_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn single(common: CommonOpts, opts: ScenarioOpts, urls: Vec<String>) -> ExitCode {
    let threads = threads(&common);
    let launcher = WorkerLauncher::current();
    let outcome = runtime(common.client_threads).and_then(|rt| {
        rt.block_on(interruptible(run::run_single(
            &common,
            &opts,
            &urls,
            threads,
            launcher.as_ref(),
        )))
    });
    conclude(&common, outcome)
}

/// Runs `work` unless Ctrl-C comes first; dropping `work` stops every child process it
/// started (their guards kill them).
async fn interruptible<T>(work: impl std::future::Future<Output = Result<T>>) -> Result<Option<T>> {
    tokio::select! {
        result = work => result.map(Some),
        _ = tokio::signal::ctrl_c() => {
            eprintln!("wsrelay-loadtest: interrupted; stopping everything it started");
            Ok(None)
        }
    }
}

fn conclude(common: &CommonOpts, outcome: Result<Option<RunReport>>) -> ExitCode {
    let report = match outcome {
        Ok(Some(report)) => report,
        Ok(None) => return ExitCode::from(130),
        Err(error) => return fail(error),
    };
    print!("{}", report::table::render(&report));
    if let Some(path) = &common.json {
        if let Err(error) = report::write_json(&report, path) {
            return fail(error);
        }
        eprintln!("JSON written to {}", path.display());
    }
    if let Some(path) = &common.markdown {
        if let Err(error) = std::fs::write(path, report::table::markdown(&report)) {
            return fail(anyhow::anyhow!("write {}: {error}", path.display()));
        }
        eprintln!("Markdown written to {}", path.display());
    }
    if let Some(path) = &common.html {
        if let Err(error) = report::html::write(&report, path) {
            return fail(error);
        }
        eprintln!("HTML written to {}", path.display());
    }
    if report.errors_total > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

fn runtime(threads: Option<usize>) -> Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n.max(1));
    }
    builder
        .enable_all()
        .build()
        .context("start the tokio runtime")
}

fn finish(outcome: Result<()>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(error),
    }
}

fn fail(error: anyhow::Error) -> ExitCode {
    eprintln!("wsrelay-loadtest: {error:#}");
    ExitCode::FAILURE
}

/// The relay library in this process, until SIGTERM or SIGINT.
async fn serve_relay(config: PathBuf) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let source =
        std::fs::read_to_string(&config).with_context(|| format!("read {}", config.display()))?;
    let config = wsrelay::config::Config::from_toml(&source, &config.display().to_string())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let relay = wsrelay::Relay::bind(config).await?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    relay.shutdown().await;
    Ok(())
}
