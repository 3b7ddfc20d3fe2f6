//! Worker processes for `hold` runs bigger than one process may hold (its open-file limit).
//!
//! The parent starts `wsrelay-loadtest hold-worker --spec JSON` once per share. A worker opens
//! its share, then talks over its pipes, one JSON object per stdout line:
//!
//! ```text
//! {"event":"progress","connected":N,"failed":M}   every 250 ms
//! {"event":"ramped","connected":N,"failed":M}     when every attempt has finished
//! {"event":"done","summary":{...HoldSummary}}     after it closed its connections
//! ```
//!
//! It closes its connections when the parent writes `close` to its stdin, when stdin ends (the
//! parent died), or when its own `max_lifetime` runs out, so no worker outlives its run.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::oneshot;

use crate::conn::{Connector, TargetUrl, loopback_sources};
use crate::scenario::CommonOpts;
use crate::scenario::RunTarget;
use crate::scenario::hold::{HeldSet, HoldOpts, HoldSummary, Share};
use crate::stats::Counters;

/// How to start a worker: the harness's own executable.
#[derive(Debug, Clone)]
pub struct WorkerLauncher {
    /// Path of `wsrelay-loadtest`.
    pub exe: PathBuf,
}

impl WorkerLauncher {
    /// The running executable, if it can be found.
    pub fn current() -> Option<WorkerLauncher> {
        std::env::current_exe()
            .ok()
            .map(|exe| WorkerLauncher { exe })
    }
}

/// Everything a worker needs, passed as JSON on its command line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Target URLs (connections spread round-robin by global index).
    pub targets: Vec<String>,
    /// Which connections this worker holds.
    pub share: Share,
    /// Loopback source addresses of the whole run (by global index).
    pub source_addrs: usize,
    /// Handshakes at once.
    pub connect_concurrency: usize,
    /// Limit of one connect, in ms.
    pub connect_timeout_ms: u64,
    /// Client ping interval in ms (0: none).
    pub ping_interval_ms: u64,
    /// Close everything and exit after this long, in ms, whatever happens.
    pub max_lifetime_ms: u64,
    /// Targets may be non-loopback.
    pub allow_remote: bool,
}

/// One line a worker prints.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
enum Event {
    Progress { connected: u64, failed: u64 },
    Ramped { connected: u64, failed: u64 },
    Done { summary: HoldSummary },
}

fn emit(event: &Event) {
    println!(
        "{}",
        serde_json::to_string(event).expect("events serialize")
    );
}

/// The worker side: runs one share as `spec` says (the `hold-worker` subcommand).
pub async fn worker_main(spec: WorkerSpec) -> Result<()> {
    crate::procstat::raise_fd_limit();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(spec.max_lifetime_ms);
    let mut targets = Vec::new();
    for url in &spec.targets {
        targets.push(TargetUrl::resolve(url, spec.allow_remote).await?);
    }
    let sources = if spec.source_addrs > 1 {
        loopback_sources(spec.source_addrs, 1)
    } else {
        Vec::new()
    };
    let connector = Connector::new(
        targets,
        sources,
        Duration::from_millis(spec.connect_timeout_ms),
    );
    let counters = Arc::new(Counters::default());
    let progress = {
        let counters = counters.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                emit(&Event::Progress {
                    connected: Counters::get(&counters.connected),
                    failed: Counters::get(&counters.failed),
                });
            }
        })
    };
    let held = tokio::select! {
        held = HeldSet::ramp(
            &connector,
            spec.share,
            spec.connect_concurrency,
            Duration::from_millis(spec.ping_interval_ms),
            counters.clone(),
        ) => held,
        _ = tokio::time::sleep_until(deadline) => bail!("the ramp outlived the worker's lifetime"),
    };
    emit(&Event::Ramped {
        connected: Counters::get(&counters.connected),
        failed: Counters::get(&counters.failed),
    });
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = stdin.next_line() => match line {
                Ok(Some(line)) if line.trim() == "close" => break,
                Ok(Some(_)) => continue,
                _ => break,
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    let summary = held.close().await;
    progress.abort();
    emit(&Event::Done { summary });
    Ok(())
}

/// The parent side: running workers that have opened their shares.
pub struct WorkerFleet {
    workers: Vec<Worker>,
}

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    done: Option<oneshot::Receiver<HoldSummary>>,
}

impl WorkerFleet {
    /// Starts `count` workers, splitting the run's connections and connect rate between them,
    /// and returns once every worker has finished its ramp.
    pub async fn ramp(
        launcher: &WorkerLauncher,
        common: &CommonOpts,
        opts: &HoldOpts,
        target: &RunTarget,
        count: usize,
        counters: Arc<Counters>,
    ) -> Result<WorkerFleet> {
        let per = common.connections.div_ceil(count);
        let ramp_bound = Duration::from_secs(60)
            + common
                .connect_timeout
                .mul_f64((per / common.connect_concurrency.max(1) + 1) as f64)
            + if opts.connect_rate > 0.0 {
                Duration::from_secs_f64(common.connections as f64 / opts.connect_rate)
            } else {
                Duration::ZERO
            };
        let lifetime = ramp_bound + common.duration + opts.settle * 2 + Duration::from_secs(60);
        let mut workers = Vec::new();
        let mut ramped = Vec::new();
        for i in 0..count {
            let first = i * per;
            let connections = per.min(common.connections - first);
            let spec = WorkerSpec {
                targets: target.connector.urls(),
                share: Share {
                    connections,
                    first_index: first,
                    connect_rate: opts.connect_rate / count as f64,
                    key_space: opts.key_space,
                },
                source_addrs: common.source_count(common.connections),
                connect_concurrency: common.connect_concurrency.div_ceil(count),
                connect_timeout_ms: common.connect_timeout.as_millis() as u64,
                ping_interval_ms: opts.ping_interval.as_millis() as u64,
                max_lifetime_ms: lifetime.as_millis() as u64,
                allow_remote: common.allow_remote,
            };
            let mut child = Command::new(&launcher.exe)
                .arg("hold-worker")
                .arg("--spec")
                .arg(serde_json::to_string(&spec)?)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("start worker {}", launcher.exe.display()))?;
            let stdout = child.stdout.take().expect("piped stdout");
            let stdin = child.stdin.take();
            let (ramped_tx, ramped_rx) = oneshot::channel();
            let (done_tx, done_rx) = oneshot::channel();
            let counters = counters.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                let (mut connected, mut failed) = (0u64, 0u64);
                let mut ramped_tx = Some(ramped_tx);
                let mut done_tx = Some(done_tx);
                let mut update = |c: u64, f: u64| {
                    counters.connected.fetch_add(
                        c.saturating_sub(connected),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    counters.failed.fetch_add(
                        f.saturating_sub(failed),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    connected = connected.max(c);
                    failed = failed.max(f);
                };
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<Event>(&line) {
                        Ok(Event::Progress { connected, failed }) => update(connected, failed),
                        Ok(Event::Ramped { connected, failed }) => {
                            update(connected, failed);
                            if let Some(tx) = ramped_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(Event::Done { summary }) => {
                            if let Some(tx) = done_tx.take() {
                                let _ = tx.send(summary);
                            }
                        }
                        Err(_) => eprintln!("hold worker: {line}"),
                    }
                }
            });
            ramped.push(ramped_rx);
            workers.push(Worker {
                child,
                stdin,
                done: Some(done_rx),
            });
        }
        let fleet = WorkerFleet { workers };
        for (i, rx) in ramped.into_iter().enumerate() {
            match tokio::time::timeout(ramp_bound, rx).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => bail!("hold worker {i} exited during its ramp"),
                Err(_) => bail!("hold worker {i} did not finish its ramp within {ramp_bound:?}"),
            }
        }
        Ok(fleet)
    }

    /// Tells every worker to close its connections and returns their merged summary.
    pub async fn close(mut self) -> Result<HoldSummary> {
        for worker in &mut self.workers {
            if let Some(stdin) = worker.stdin.as_mut() {
                let _ = stdin.write_all(b"close\n").await;
                let _ = stdin.flush().await;
            }
        }
        let mut merged = HoldSummary::default();
        for (i, worker) in self.workers.iter_mut().enumerate() {
            let done = worker.done.take().expect("closed once");
            let summary = tokio::time::timeout(Duration::from_secs(120), done)
                .await
                .map_err(|_| anyhow!("hold worker {i} did not finish closing within 120s"))?
                .map_err(|_| anyhow!("hold worker {i} exited without a summary"))?;
            merged.merge(&summary);
            worker.stdin.take();
            let _ = tokio::time::timeout(Duration::from_secs(10), worker.child.wait()).await;
        }
        Ok(merged)
    }
}
