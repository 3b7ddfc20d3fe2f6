//! Running a scenario: the dispatch from a scenario's options to its module, and the
//! single-target run (`wsrelay-loadtest echo --target URL ...`) that ends in a [`RunReport`].

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use crate::conn::{Connector, TargetUrl, loopback_sources};
use crate::monitor::Watched;
use crate::procstat::{MachineInfo, ProcessGroup};
use crate::report::{self, RoundFigures, RunReport, TargetReport};
use crate::scenario::churn::ChurnOpts;
use crate::scenario::echo::EchoOpts;
use crate::scenario::fanout::FanoutOpts;
use crate::scenario::hold::HoldOpts;
use crate::scenario::rate::RateOpts;
use crate::scenario::{self, CommonOpts, Measurement, RunTarget};
use crate::worker::WorkerLauncher;

/// A scenario with its own options.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum ScenarioOpts {
    /// Closed loop.
    Echo(EchoOpts),
    /// Open loop (and sweeps).
    Rate(RateOpts),
    /// Chat rooms.
    Fanout(FanoutOpts),
    /// Idle connections.
    Hold(HoldOpts),
    /// Connect, one message, close.
    Churn(ChurnOpts),
}

impl ScenarioOpts {
    /// `echo`, `rate`, `fanout`, `hold` or `churn`.
    pub fn name(&self) -> &'static str {
        match self {
            ScenarioOpts::Echo(_) => "echo",
            ScenarioOpts::Rate(_) => "rate",
            ScenarioOpts::Fanout(_) => "fanout",
            ScenarioOpts::Hold(_) => "hold",
            ScenarioOpts::Churn(_) => "churn",
        }
    }

    /// What the throughput counts.
    pub fn unit(&self) -> &'static str {
        match self {
            ScenarioOpts::Echo(_) | ScenarioOpts::Rate(_) => "messages/s",
            ScenarioOpts::Fanout(_) => "deliveries/s",
            ScenarioOpts::Hold(_) => "connections/s",
            ScenarioOpts::Churn(_) => "cycles/s",
        }
    }
}

/// Runs one scenario against one target.
pub async fn run_scenario(
    opts: &ScenarioOpts,
    common: &CommonOpts,
    target: &RunTarget,
    launcher: Option<&WorkerLauncher>,
) -> Result<Measurement> {
    Ok(match opts {
        ScenarioOpts::Echo(o) => scenario::echo::run(common, o, target).await,
        ScenarioOpts::Rate(o) => scenario::rate::run(common, o, target).await,
        ScenarioOpts::Fanout(o) => scenario::fanout::run(common, o, target).await,
        ScenarioOpts::Hold(o) => scenario::hold::run(common, o, target, launcher).await?,
        ScenarioOpts::Churn(o) => scenario::churn::run(common, o, target).await,
    })
}

/// A connector for `urls` with the source addresses `common` asks for.
pub async fn connector(common: &CommonOpts, urls: &[String]) -> Result<Connector> {
    let mut targets = Vec::new();
    for url in urls {
        targets.push(TargetUrl::resolve(url, common.allow_remote).await?);
    }
    let count = common.source_count(common.connections);
    let all_loopback = targets.iter().all(|t| t.addr.ip().is_loopback());
    let sources = if count > 1 && all_loopback {
        loopback_sources(count, 1)
    } else {
        Vec::new()
    };
    Ok(Connector::new(targets, sources, common.connect_timeout))
}

/// The run's configuration as one flat JSON object: the common options, the scenario's, and
/// `extra`.
pub fn config_json(
    common: &CommonOpts,
    opts: &ScenarioOpts,
    extra: serde_json::Map<String, serde_json::Value>,
) -> serde_json::Value {
    let mut config = serde_json::Map::new();
    for value in [
        serde_json::to_value(common).expect("options serialize"),
        serde_json::to_value(opts).expect("options serialize"),
    ] {
        if let serde_json::Value::Object(map) = value {
            config.extend(map);
        }
    }
    config.extend(extra);
    serde_json::Value::Object(config)
}

/// Runs `opts` against `urls` (connections spread over them) and reports it under the name of
/// the first URL.
pub async fn run_single(
    common: &CommonOpts,
    opts: &ScenarioOpts,
    urls: &[String],
    threads: usize,
    launcher: Option<&WorkerLauncher>,
) -> Result<RunReport> {
    common.validate().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        !urls.is_empty(),
        "give at least one --target ws://HOST:PORT/PATH"
    );
    let started = Instant::now();
    let started_unix_s = unix_now();
    let target = RunTarget {
        label: urls[0].clone(),
        connector: connector(common, urls).await?,
        watched: Watched {
            proxy: ProcessGroup::new(common.watch_pids.clone()),
            backend: ProcessGroup::default(),
        },
        show_progress: !common.no_progress,
    };
    let m = run_scenario(opts, common, &target, launcher).await?;
    let mut t = TargetReport::measured(&m, vec![RoundFigures::of(&m)], opts.unit());
    t.name = urls[0].clone();
    let mut extra = serde_json::Map::new();
    extra.insert("targets".into(), urls.into());
    extra.insert("loadgen_threads".into(), threads.into());
    let mut report = RunReport {
        scenario: opts.name().into(),
        config: config_json(common, opts, extra),
        errors_total: t.errors,
        mode: "single".into(),
        machine: MachineInfo::read(),
        loadgen_threads: threads,
        started_unix_s,
        wall_s: started.elapsed().as_secs_f64(),
        notes: Vec::new(),
        best_peer: None,
        targets: vec![t],
    };
    if common.watch_pids.is_empty() {
        report
            .notes
            .push("no --watch-pid: the proxy's CPU and memory are not reported".into());
    }
    report.notes.extend(report::saturation_notes(&report));
    Ok(report)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
