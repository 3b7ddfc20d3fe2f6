//! The soak's backends and the faults put on them: backend processes on fixed ports, killed
//! with SIGKILL at random and started again on the same port, so the relay sees a crash and
//! then the backend's return through its health checks.
//!
//! Ports are picked below the kernel's ephemeral range: a dead backend's port must still be
//! free when it restarts, and in the ephemeral range one of the thousands of outgoing
//! connections of the run could take it meanwhile.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::backend::BackendKind;
use crate::targets::{self, ChildProcess, StartError};

/// One backend: what it serves, where, and its process while it runs.
struct Slot {
    kind: BackendKind,
    addr: SocketAddr,
    process: Option<ChildProcess>,
}

/// The run's backend processes.
pub(super) struct Fleet {
    exe: PathBuf,
    slots: Vec<Slot>,
}

/// What the fault injector did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FaultCounts {
    /// Per-client backends killed.
    pub per_client_kills: u64,
    /// Mux backends killed.
    pub mux_kills: u64,
    /// Backends started again on their port.
    pub restarts: u64,
    /// Restarts that failed (the backend stayed down).
    pub restart_failures: u64,
}

impl FaultCounts {
    /// Backends killed in all.
    pub fn kills(&self) -> u64 {
        self.per_client_kills + self.mux_kills
    }
}

/// Which backends the injector may kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KillTargets {
    /// Backends of both routes.
    All,
    /// Only the per-client route's echo backends.
    PerClient,
    /// Only the mux route's backends.
    Mux,
}

impl KillTargets {
    fn includes(self, kind: BackendKind) -> bool {
        match self {
            KillTargets::All => true,
            KillTargets::PerClient => kind == BackendKind::Echo,
            KillTargets::Mux => kind == BackendKind::MuxEcho,
        }
    }
}

/// The least time between a restart and the next kill: the relay's health checks (every
/// second, see the soak's relay config) need one pass to take the backend back.
const RECOVERY: Duration = Duration::from_secs(2);

/// When and how long backends die.
#[derive(Debug, Clone, Copy)]
pub(super) struct FaultPlan {
    /// Mean time between kills (each gap uniform in half to one and a half of it); zero: none.
    pub every: Duration,
    /// How long a killed backend stays down.
    pub down_for: Duration,
    /// Which backends may die.
    pub targets: KillTargets,
    /// Seed of the choices.
    pub seed: u64,
}

impl Fleet {
    /// Starts `per_client` echo and `mux` mux-echo backends from the harness `exe`.
    pub fn start(
        exe: &Path,
        per_client: usize,
        mux: usize,
        seed: u64,
    ) -> Result<Fleet, StartError> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut fleet = Fleet {
            exe: exe.to_owned(),
            slots: Vec::new(),
        };
        let kinds = std::iter::repeat_n(BackendKind::Echo, per_client)
            .chain(std::iter::repeat_n(BackendKind::MuxEcho, mux));
        for (index, kind) in kinds.enumerate() {
            let addr = fixed_addr(&mut rng)?;
            let backend = targets::start_backend_on(exe, kind, addr, index)?;
            fleet.slots.push(Slot {
                kind,
                addr,
                process: Some(backend.process),
            });
        }
        Ok(fleet)
    }

    /// `ws://ADDR/` of every backend of `kind`.
    pub fn urls(&self, kind: BackendKind) -> Vec<String> {
        self.slots
            .iter()
            .filter(|s| s.kind == kind)
            .map(|s| format!("ws://{}/", s.addr))
            .collect()
    }

    /// Kills backend `index` with SIGKILL.
    fn kill(&mut self, index: usize, counts: &mut FaultCounts) {
        let slot = &mut self.slots[index];
        if let Some(mut process) = slot.process.take() {
            process.kill_now();
            match slot.kind {
                BackendKind::MuxEcho => counts.mux_kills += 1,
                _ => counts.per_client_kills += 1,
            }
        }
    }

    /// Starts every dead backend again on its port; a port that is still taken is retried for
    /// a few seconds.
    fn restart_dead(&mut self, counts: &mut FaultCounts) {
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if slot.process.is_some() {
                continue;
            }
            let mut attempts = 0;
            loop {
                match targets::start_backend_on(&self.exe, slot.kind, slot.addr, index) {
                    Ok(backend) => {
                        slot.process = Some(backend.process);
                        counts.restarts += 1;
                        break;
                    }
                    Err(error) if attempts >= 10 => {
                        eprintln!("soak: backend {} stays down: {error}", slot.addr);
                        counts.restart_failures += 1;
                        break;
                    }
                    Err(_) => {
                        attempts += 1;
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
            }
        }
    }
}

/// The thread that kills and restarts backends. It owns the fleet for the whole run, and
/// stopping the faults leaves it (and the fleet) alive until the injector is dropped: every
/// backend is started with `PR_SET_PDEATHSIG`, which fires when the *thread* that spawned it
/// ends, so a backend this thread restarted would die with it.
pub(super) struct Injector {
    stop: Option<mpsc::Sender<()>>,
    counts: mpsc::Receiver<FaultCounts>,
    release: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Injector {
    /// Starts injecting `plan` into `fleet`.
    pub fn start(fleet: Fleet, plan: FaultPlan) -> Injector {
        let (stop, stopped) = mpsc::channel();
        let (counted, counts) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let (fleet, faults) = inject(fleet, plan, stopped);
            let _ = counted.send(faults);
            // The backends live as long as this thread: until the injector is dropped.
            let _ = released.recv();
            drop(fleet);
        });
        Injector {
            stop: Some(stop),
            counts,
            release: Some(release),
            thread: Some(thread),
        }
    }

    /// Stops injecting and restarts any backend still down; every backend keeps running
    /// until the injector is dropped. Blocks until the restarts are done.
    pub fn stop(&mut self) -> FaultCounts {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.counts.recv().unwrap_or_default()
    }
}

impl Drop for Injector {
    /// Stops the faults if they still run, then every backend.
    fn drop(&mut self) {
        self.stop.take();
        self.release.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn inject(mut fleet: Fleet, plan: FaultPlan, stopped: mpsc::Receiver<()>) -> (Fleet, FaultCounts) {
    let mut counts = FaultCounts::default();
    let mut rng = fastrand::Rng::with_seed(plan.seed ^ 0x5eed_fa17);
    // True when told to stop (or the owner is gone) before `until`.
    let wait = |until: Instant| {
        !matches!(
            stopped.recv_timeout(until.saturating_duration_since(Instant::now())),
            Err(mpsc::RecvTimeoutError::Timeout)
        )
    };
    if plan.every.is_zero() {
        let _ = stopped.recv();
        return (fleet, counts);
    }
    loop {
        // A restarted backend is back in the ranking after one passing health check; the
        // next kill waits for that, or a client could find no healthy backend at all (and be
        // closed 1012, as designed) when its whole rank is down.
        let gap = plan.every.mul_f64(0.5 + rng.f64()).max(RECOVERY);
        if wait(Instant::now() + gap) {
            break;
        }
        let candidates: Vec<usize> = (0..fleet.slots.len())
            .filter(|&i| plan.targets.includes(fleet.slots[i].kind))
            .collect();
        if let Some(&victim) = rng.choice(candidates.iter()) {
            fleet.kill(victim, &mut counts);
        }
        let stop_now = wait(Instant::now() + plan.down_for);
        fleet.restart_dead(&mut counts);
        if stop_now {
            break;
        }
    }
    fleet.restart_dead(&mut counts);
    (fleet, counts)
}

/// A free address on 127.0.0.1 with a port below the ephemeral range.
fn fixed_addr(rng: &mut fastrand::Rng) -> Result<SocketAddr, StartError> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.saturating_sub(1).max(10_001));
    for _ in 0..200 {
        let addr = SocketAddr::from(([127, 0, 0, 1], rng.u16(low..high)));
        if TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    Err(StartError::Failed {
        what: "pick a backend port".into(),
        reason: format!("no free port between {low} and {high} after 200 tries"),
    })
}
