//! The processes `compare` starts and always stops: backends, the relay (per-client and mux),
//! and the peer proxies (nginx, HAProxy, Caddy), each in a temporary directory of its own.
//!
//! Every child runs in its own process group with `PR_SET_PDEATHSIG = SIGKILL`, so it dies with
//! the harness even if the harness is killed outright; normally [`ChildProcess`]'s `Drop` sends
//! SIGTERM to the group, waits up to two seconds, then SIGKILLs it. Nothing here touches a
//! system service: each peer proxy runs from a config in the temp directory, as a child.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::backend::BackendKind;

/// Why a target could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// This build can't do it (mux on a relay without mux, a missing optional binary): the
    /// target is reported as skipped, not failed.
    #[error("{0}")]
    Unsupported(String),
    /// Something that should have worked didn't.
    #[error("{what}: {reason}")]
    Failed {
        /// What was being started.
        what: String,
        /// Why it failed.
        reason: String,
    },
}

fn failed(what: impl Into<String>, reason: impl ToString) -> StartError {
    StartError::Failed {
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// A directory under the system temp dir, removed on drop unless kept.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// Creates `$TMPDIR/wsrelay-loadtest-PID-NANOS`.
    pub fn new(keep: bool) -> std::io::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("wsrelay-loadtest-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path, keep })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A child process the harness owns; stopped (with its whole process group) on drop.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    child: Child,
    log: Option<PathBuf>,
}

impl ChildProcess {
    /// Spawns `command` in its own process group, killed if the harness dies.
    pub fn spawn(
        name: &str,
        mut command: Command,
        log: Option<PathBuf>,
    ) -> Result<Self, StartError> {
        command.process_group(0);
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| failed(format!("start {name}"), e))?;
        Ok(ChildProcess {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its name in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its stdin, if it was piped and not taken yet (the harness's commands to it).
    pub fn take_stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.child.stdin.take()
    }

    /// `Some(description)` if it has exited, with the end of its log.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "{} exited ({status}){}",
                self.name,
                self.log_tail()
                    .map(|t| format!(": {t}"))
                    .unwrap_or_default()
            )),
            _ => None,
        }
    }

    /// The last lines of its log file, if it has one.
    pub fn log_tail(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.log.as_ref()?).ok()?;
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        (!lines.is_empty()).then(|| lines.into_iter().rev().collect::<Vec<_>>().join(" | "))
    }

    /// Waits until `addr` accepts TCP connections (or the child exits, or `timeout` passes).
    pub fn wait_for_port(&mut self, addr: SocketAddr, timeout: Duration) -> Result<(), StartError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = self.exited() {
                return Err(failed(format!("start {}", self.name), exit));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(failed(
                    format!("start {}", self.name),
                    format!("{addr} did not accept connections within {timeout:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL to its process group at once (a crash, as far as its peers can tell), then
    /// reaps it.
    pub fn kill_now(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: signalling a process group we created.
        unsafe { libc::killpg(self.child.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.child.wait();
    }

    /// SIGTERM to its process group, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let group = self.child.id() as libc::pid_t;
        // SAFETY: signalling a process group we created.
        unsafe { libc::killpg(group, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                // Workers of a master (nginx) may linger a moment: make sure the group is gone.
                // SAFETY: as above.
                unsafe { libc::killpg(group, libc::SIGKILL) };
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe { libc::killpg(group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}

/// A free TCP port on 127.0.0.1 (bound and released: another process could take it first, a
/// race the start-up check then reports).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A running backend process.
#[derive(Debug)]
pub struct Backend {
    /// The process.
    pub process: ChildProcess,
    /// Its `ws://` URL.
    pub url: String,
}

/// Starts `wsrelay-loadtest serve KIND` from `exe` on any free port and waits for its
/// `listening on` line.
pub fn start_backend(exe: &Path, kind: BackendKind, index: usize) -> Result<Backend, StartError> {
    start_backend_on(exe, kind, SocketAddr::from(([127, 0, 0, 1], 0)), index)
}

/// Starts `wsrelay-loadtest serve KIND --listen LISTEN` from `exe` and waits for its
/// `listening on` line.
pub fn start_backend_on(
    exe: &Path,
    kind: BackendKind,
    listen: SocketAddr,
    index: usize,
) -> Result<Backend, StartError> {
    let name = format!("{} backend {index}", kind.name());
    let mut command = Command::new(exe);
    command
        .arg("serve")
        .arg(kind.name())
        .arg("--listen")
        .arg(listen.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut process = ChildProcess::spawn(&name, command, None)?;
    let lines = ChildLines::take(&mut process);
    let url = listening_url(&mut process, &lines)?;
    Ok(Backend { process, url })
}

/// The lines a child prints on its piped stdout, read by a thread of their own so that a wait
/// for one can time out. The thread ends when the child's stdout does.
#[derive(Debug)]
pub struct ChildLines {
    lines: std::sync::mpsc::Receiver<String>,
}

impl ChildLines {
    /// Reads `process`'s stdout from now on (nothing comes if it was not piped).
    pub fn take(process: &mut ChildProcess) -> ChildLines {
        let (tx, lines) = std::sync::mpsc::channel();
        if let Some(stdout) = process.child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { return };
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        ChildLines { lines }
    }

    /// The next line, waiting at most `timeout` (blocking this thread); `None` if none came or
    /// stdout has ended.
    pub fn next(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// The next line, waiting at most `timeout` without blocking the runtime's thread (it
    /// looks every 10 ms: for the few answers of a run, not for streams of lines).
    pub async fn next_async(&self, timeout: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.lines.try_recv() {
                Ok(line) => return Some(line),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return None,
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Waits up to 10 s for the `listening on ws://ADDR/` line a backend of the harness prints
/// first, and returns the URL.
pub fn listening_url(process: &mut ChildProcess, lines: &ChildLines) -> Result<String, StartError> {
    let what = format!("start {}", process.name());
    let Some(line) = lines.next(Duration::from_secs(10)) else {
        let why = process
            .exited()
            .unwrap_or_else(|| "no `listening on` line within 10s".into());
        return Err(failed(what, why));
    };
    line.trim()
        .strip_prefix("listening on ")
        .map(str::to_owned)
        .ok_or_else(|| failed(what, format!("unexpected output {line:?}")))
}

/// A mux backend (`mux_echo_backend` example of the client SDK) listening on a free port.
pub fn start_mux_backend(bin: &Path, index: usize) -> Result<Backend, StartError> {
    let port = free_port().map_err(|e| failed("pick a port", e))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut command = Command::new(bin);
    command
        .arg("--listen")
        .arg(addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut process = ChildProcess::spawn(&format!("mux backend {index}"), command, None)?;
    process.wait_for_port(addr, Duration::from_secs(10))?;
    Ok(Backend {
        process,
        url: format!("ws://{addr}/"),
    })
}

/// How the relay is run.
#[derive(Debug, Clone)]
pub enum RelayBin {
    /// The real `wsrelay` binary.
    Binary(PathBuf),
    /// The relay library compiled into this harness, run as `wsrelay-loadtest serve-relay`
    /// (for tests, where cargo builds no `wsrelay` binary; it logs nothing).
    Builtin(PathBuf),
}

impl RelayBin {
    /// A description for reports.
    pub fn describe(&self) -> String {
        match self {
            RelayBin::Binary(p) => p.display().to_string(),
            RelayBin::Builtin(p) => format!("{} serve-relay (built-in library)", p.display()),
        }
    }
}

/// The programs a run that starts its own relay finds: the harness itself (its backends are
/// `EXE serve ...`) and the relay.
#[derive(Debug, Clone)]
pub struct Programs {
    /// The harness executable.
    pub harness: PathBuf,
    /// The relay.
    pub relay: RelayBin,
}

/// The programs of a run started from the harness executable at `harness`: the `wsrelay`
/// binary from `relay_bin`, else beside the harness, unless `builtin`.
pub fn programs(
    harness: &Path,
    relay_bin: Option<&Path>,
    builtin: bool,
) -> Result<Programs, String> {
    let relay = if builtin {
        RelayBin::Builtin(harness.to_owned())
    } else {
        let bin = relay_bin
            .map(Path::to_owned)
            .or_else(|| sibling("wsrelay"))
            .ok_or("no wsrelay binary beside the harness: build it (cargo build --release -p wsrelay) or pass --relay-bin PATH or --relay-builtin")?;
        RelayBin::Binary(bin)
    };
    Ok(Programs {
        harness: harness.to_owned(),
        relay,
    })
}

/// A relay's route mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    /// One backend WebSocket per client.
    PerClient,
    /// Clients multiplexed over `mux_links` shared links per backend.
    Mux,
}

/// What a relay config says.
#[derive(Debug, Clone)]
pub struct RelaySpec {
    /// Route mode.
    pub mode: RelayMode,
    /// Backend URLs.
    pub backends: Vec<String>,
    /// `hash_key` of the route.
    pub hash_key: String,
    /// Largest message, in bytes (the relay's default is 1 MiB).
    pub max_message: usize,
    /// `[server] reuse_port`: relays with the same config share the port.
    pub reuse_port: bool,
}

/// The relay config file for `spec` listening on `port`.
pub fn relay_config(spec: &RelaySpec, port: u16) -> String {
    let backends: Vec<String> = spec.backends.iter().map(|b| format!("{b:?}")).collect();
    let (mode, links) = match spec.mode {
        RelayMode::PerClient => ("per-client", ""),
        RelayMode::Mux => ("mux", "mux_links = 2\n"),
    };
    let size = spec.max_message.max(1 << 20);
    let reuse_port = if spec.reuse_port {
        "reuse_port = true\n"
    } else {
        ""
    };
    format!(
        "# written by wsrelay-loadtest\n\
         [server]\nlisten = \"127.0.0.1:{port}\"\n{reuse_port}max_connections = 200000\n\
         handshake_timeout = \"10s\"\nshutdown_grace = \"1s\"\n\n\
         [limits]\nmax_message_size = {size}\nmax_frame_size = {size}\n\n\
         [[route]]\npath = \"/\"\nupstream = \"bench\"\nmode = \"{mode}\"\nhash_key = \"{}\"\n\n\
         [upstream.bench]\nbackends = [{}]\n{links}",
        spec.hash_key,
        backends.join(", ")
    )
}

/// Checks a relay config with the relay itself; `Unsupported` if it says "not supported".
pub fn check_relay_config(bin: &RelayBin, config: &Path) -> Result<(), StartError> {
    let (text, ok) = match bin {
        RelayBin::Binary(path) => {
            let output = Command::new(path)
                .arg("check")
                .arg("--config")
                .arg(config)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| failed(format!("run {} check", path.display()), e))?;
            (
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ),
                output.status.success(),
            )
        }
        RelayBin::Builtin(_) => {
            let source = std::fs::read_to_string(config).map_err(|e| failed("read config", e))?;
            match wsrelay::config::Config::from_toml(&source, &config.display().to_string()) {
                Ok(_) => (String::new(), true),
                Err(error) => (error.to_string(), false),
            }
        }
    };
    if ok {
        Ok(())
    } else if text.contains("not supported") {
        let line = text
            .lines()
            .find_map(|l| l.find("not supported").map(|at| l[at..].trim().to_owned()))
            .unwrap_or_default();
        Err(StartError::Unsupported(format!(
            "not supported by this relay build ({line})"
        )))
    } else {
        Err(failed("relay config check", text.trim()))
    }
}

/// A running relay.
#[derive(Debug)]
pub struct Relay {
    /// The process.
    pub process: ChildProcess,
    /// Where clients connect.
    pub url: String,
}

/// Writes the config, checks it, starts the relay and waits for its port. `workers` sets
/// `TOKIO_WORKER_THREADS`; `log` sets `RUST_LOG` (the relay logs to a file in `dir`).
pub fn start_relay(
    bin: &RelayBin,
    spec: &RelaySpec,
    dir: &Path,
    workers: Option<usize>,
    log: &str,
) -> Result<Relay, StartError> {
    let name = match spec.mode {
        RelayMode::PerClient => "relay-per-client",
        RelayMode::Mux => "relay-mux",
    };
    let port = free_port().map_err(|e| failed("pick a port", e))?;
    let launch = RelayLaunch {
        name,
        config: relay_config(spec, port),
        port,
        workers,
        log,
    };
    launch.start(bin, dir)
}

/// A relay to start from a config of the caller's.
#[derive(Debug, Clone)]
pub struct RelayLaunch<'a> {
    /// Its name in messages, and of its config and log files.
    pub name: &'a str,
    /// The config file's text.
    pub config: String,
    /// The port `config` listens on, on 127.0.0.1.
    pub port: u16,
    /// `TOKIO_WORKER_THREADS`, if set.
    pub workers: Option<usize>,
    /// `RUST_LOG`.
    pub log: &'a str,
}

impl RelayLaunch<'_> {
    /// Writes the config into `dir`, checks it, starts the relay and waits for its port.
    pub fn start(&self, bin: &RelayBin, dir: &Path) -> Result<Relay, StartError> {
        let name = self.name;
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, &self.config).map_err(|e| failed("write config", e))?;
        check_relay_config(bin, &config)?;
        let mut process = spawn_relay(name, bin, &config, dir, self.workers, self.log)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        process.wait_for_port(addr, Duration::from_secs(15))?;
        Ok(Relay {
            process,
            url: format!("ws://{addr}/"),
        })
    }
}

/// Starts relay `name` from the (checked) `config` file, logging to `dir/NAME.log`, and
/// returns at once: the caller decides how to know it is ready. `workers` sets
/// `TOKIO_WORKER_THREADS`; `log` sets `RUST_LOG`.
pub fn spawn_relay(
    name: &str,
    bin: &RelayBin,
    config: &Path,
    dir: &Path,
    workers: Option<usize>,
    log: &str,
) -> Result<ChildProcess, StartError> {
    let log_path = dir.join(format!("{name}.log"));
    let log_file = std::fs::File::create(&log_path).map_err(|e| failed("create log", e))?;
    let mut command = match bin {
        RelayBin::Binary(path) => Command::new(path),
        RelayBin::Builtin(exe) => {
            let mut c = Command::new(exe);
            c.arg("serve-relay");
            c
        }
    };
    command
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    if let Some(n) = workers {
        command.env("TOKIO_WORKER_THREADS", n.to_string());
    }
    ChildProcess::spawn(name, command, Some(log_path))
}

/// The proxies `compare` runs beside the relay, each from its Debian package and a config of
/// its own in the temp dir, as a child process (never the system service).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// nginx, the classic WebSocket reverse-proxy config.
    Nginx,
    /// HAProxy: `balance source`, `hash-type consistent`, `timeout tunnel`.
    Haproxy,
    /// Caddy: `reverse_proxy` with `lb_policy ip_hash`.
    Caddy,
}

/// How a peer proxy picks a client's backend, so it keeps the same keys together as the relay
/// (`hash_key`) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerHash {
    /// By the client's address (the relay's `remote_addr`).
    ClientAddress,
    /// By the `room` query parameter (the relay's `query:room`, for fanout). Caddy 2.6 has no
    /// query policy: it hashes the whole URI, which holds the room and nothing that varies
    /// within one.
    RoomParameter,
}

/// What a peer proxy's config says.
#[derive(Debug, Clone, Copy)]
pub struct PeerSpec<'a> {
    /// Its own directory: config, pid file, logs, Caddy's data.
    pub dir: &'a Path,
    /// The port it listens on, on 127.0.0.1.
    pub port: u16,
    /// Backend `ws://` URLs.
    pub backends: &'a [String],
    /// How it spreads clients over them.
    pub hash: PeerHash,
    /// Worker processes (nginx), threads (HAProxy) or `GOMAXPROCS` (Caddy).
    pub workers: usize,
}

impl PeerSpec<'_> {
    /// `host:port` of each backend.
    fn hosts(&self) -> impl Iterator<Item = &str> {
        self.backends
            .iter()
            .map(|b| b.trim_start_matches("ws://").trim_end_matches('/'))
    }
}

impl Peer {
    /// Every peer, in report order.
    pub const ALL: [Peer; 3] = [Peer::Nginx, Peer::Haproxy, Peer::Caddy];

    /// Its name in reports, and of its binary.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Nginx => "nginx",
            Peer::Haproxy => "haproxy",
            Peer::Caddy => "caddy",
        }
    }

    /// Where Debian's package installs it, for when it is not on PATH (root's PATH has
    /// /usr/sbin, a user's may not).
    fn packaged_path(self) -> &'static str {
        match self {
            Peer::Nginx => "/usr/sbin/nginx",
            Peer::Haproxy => "/usr/sbin/haproxy",
            Peer::Caddy => "/usr/bin/caddy",
        }
    }

    /// Finds the binary: the given path, else its name on PATH, else where Debian puts it.
    pub fn find(self, given: Option<&Path>) -> Option<PathBuf> {
        if let Some(path) = given {
            return path.exists().then(|| path.to_owned());
        }
        let on_path = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(self.name()))
                .find(|candidate| candidate.is_file())
        });
        on_path.or_else(|| {
            let packaged = PathBuf::from(self.packaged_path());
            packaged.is_file().then_some(packaged)
        })
    }

    /// Why it was skipped, when [`Peer::find`] finds nothing.
    pub fn missing(self) -> String {
        format!(
            "{} is not installed (apt-get update && apt-get install -y {})",
            self.name(),
            self.name()
        )
    }

    /// Its version line (`nginx -v`, `haproxy -v`, `caddy version`).
    pub fn version(self, bin: &Path) -> String {
        let arg = match self {
            Peer::Nginx | Peer::Haproxy => "-v",
            Peer::Caddy => "version",
        };
        Command::new(bin)
            .arg(arg)
            .stdin(Stdio::null())
            .output()
            .ok()
            .and_then(|o| {
                // nginx answers on stderr, the others on stdout.
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                text.lines().next().map(|l| l.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into())
    }

    /// Its config file's name in its directory.
    fn config_name(self) -> &'static str {
        match self {
            Peer::Nginx => "nginx.conf",
            Peer::Haproxy => "haproxy.cfg",
            Peer::Caddy => "Caddyfile",
        }
    }

    /// The config file for `spec`.
    pub fn config(self, spec: &PeerSpec<'_>) -> String {
        match self {
            Peer::Nginx => nginx_config(spec),
            Peer::Haproxy => haproxy_config(spec),
            Peer::Caddy => caddy_config(spec),
        }
    }

    /// The arguments that run it in the foreground from `config` in `dir` (`check`: that only
    /// check the config and exit).
    fn args(self, dir: &Path, config: &Path, check: bool) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        match self {
            Peer::Nginx => {
                // -e: nginx writes its early errors to the default error log (under /var/log)
                // before it has read the config; this keeps them in the temp dir too.
                args.extend(["-p".into(), dir.into(), "-c".into(), config.into()]);
                args.extend(["-e".into(), dir.join("error.log").into()]);
                if check {
                    args.push("-t".into());
                }
            }
            Peer::Haproxy => {
                // -db: stay in the foreground, one process, so its pid is the proxy.
                args.push(if check { "-c" } else { "-db" }.into());
                args.extend(["-f".into(), config.into()]);
            }
            Peer::Caddy => {
                args.push(if check { "validate" } else { "run" }.into());
                args.extend(["--config".into(), config.into()]);
                args.extend(["--adapter".into(), "caddyfile".into()]);
            }
        }
        args
    }

    /// Environment it runs with: Caddy's data and config dirs in `dir` (else it writes under
    /// $HOME), and its Go scheduler held to `workers` threads to match the others.
    fn env(self, dir: &Path, workers: usize) -> Vec<(&'static str, std::ffi::OsString)> {
        match self {
            Peer::Nginx | Peer::Haproxy => Vec::new(),
            Peer::Caddy => vec![
                ("HOME", dir.into()),
                ("XDG_DATA_HOME", dir.join("data").into()),
                ("XDG_CONFIG_HOME", dir.join("config").into()),
                ("GOMAXPROCS", workers.to_string().into()),
            ],
        }
    }

    /// The file its errors go to: nginx's error log (set in its config), the others' stderr.
    fn log_name(self) -> &'static str {
        match self {
            Peer::Nginx => "error.log",
            Peer::Haproxy | Peer::Caddy => "stderr.log",
        }
    }
}

/// nginx configured as in the classic WebSocket proxying guide: HTTP/1.1 to the upstream,
/// Upgrade and Connection headers passed, `hash ... consistent`, long read timeout. Master
/// process on, `workers` workers, everything under the spec's dir.
pub fn nginx_config(spec: &PeerSpec<'_>) -> String {
    let servers: String = spec
        .hosts()
        .map(|host| format!("        server {host};\n"))
        .collect();
    let hash = match spec.hash {
        PeerHash::ClientAddress => "$remote_addr",
        PeerHash::RoomParameter => "$arg_room",
    };
    let (d, port, workers) = (spec.dir.display(), spec.port, spec.workers);
    // `worker_connections` just under the 20,000 files a process may hold: a held client takes
    // two, and nginx starts closing connections to reuse them once fewer than a sixteenth of its
    // slots are free (19,000 reset about 94 handshakes of `hold`'s 9,000).
    format!(
        "# written by wsrelay-loadtest: the classic WebSocket reverse-proxy setup\n\
         daemon off;\nmaster_process on;\nworker_processes {workers};\n\
         worker_rlimit_nofile 20000;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\n\
         events {{\n    worker_connections 19900;\n}}\n\n\
         http {{\n    access_log {d}/access.log;\n\
         \x20   client_body_temp_path {d}/client_body;\n    proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n\n\
         \x20   map $http_upgrade $connection_upgrade {{\n        default upgrade;\n        ''      close;\n    }}\n\n\
         \x20   upstream backends {{\n        hash {hash} consistent;\n{servers}    }}\n\n\
         \x20   server {{\n        listen 127.0.0.1:{port};\n        location / {{\n\
         \x20           proxy_pass http://backends;\n            proxy_http_version 1.1;\n\
         \x20           proxy_set_header Upgrade $http_upgrade;\n\
         \x20           proxy_set_header Connection $connection_upgrade;\n\
         \x20           proxy_set_header Host $host;\n\
         \x20           proxy_read_timeout 3600s;\n            proxy_send_timeout 3600s;\n\
         \x20       }}\n    }}\n}}\n"
    )
}

/// HAProxy as its docs proxy WebSockets: HTTP mode (it switches to a tunnel after the `101`),
/// `balance source` (or the `room` URL parameter) with `hash-type consistent`, `timeout
/// tunnel` for the upgraded connection, one process with `workers` threads. `maxconn` fits
/// two sockets per client in the 20,000 files a process may hold here.
pub fn haproxy_config(spec: &PeerSpec<'_>) -> String {
    let servers: String = spec
        .hosts()
        .enumerate()
        .map(|(i, host)| format!("    server b{i} {host}\n"))
        .collect();
    let balance = match spec.hash {
        PeerHash::ClientAddress => "source",
        PeerHash::RoomParameter => "url_param room",
    };
    let (port, workers) = (spec.port, spec.workers);
    format!(
        "# written by wsrelay-loadtest: WebSocket proxying as in HAProxy's docs\n\
         global\n    nbthread {workers}\n    maxconn 9900\n\n\
         defaults\n    mode http\n    timeout connect 5s\n    timeout client 3600s\n\
         \x20   timeout server 3600s\n    timeout tunnel 3600s\n    timeout http-request 10s\n\n\
         frontend clients\n    bind 127.0.0.1:{port}\n    default_backend backends\n\n\
         backend backends\n    balance {balance}\n    hash-type consistent\n{servers}"
    )
}

/// Caddy's `reverse_proxy` (it proxies WebSocket upgrades by itself) with a consistent hash of
/// the client's address (`ip_hash`; `uri_hash` for rooms), plain HTTP on 127.0.0.1 only, no
/// admin endpoint (its data and autosaved config go to the temp dir).
pub fn caddy_config(spec: &PeerSpec<'_>) -> String {
    let upstreams: Vec<&str> = spec.hosts().collect();
    let policy = match spec.hash {
        PeerHash::ClientAddress => "ip_hash",
        PeerHash::RoomParameter => "uri_hash",
    };
    let port = spec.port;
    format!(
        "# written by wsrelay-loadtest: Caddy's reverse_proxy\n\
         {{\n    admin off\n    auto_https off\n}}\n\n\
         http://127.0.0.1:{port} {{\n    bind 127.0.0.1\n\
         \x20   reverse_proxy {} {{\n        lb_policy {policy}\n    }}\n}}\n",
        upstreams.join(" ")
    )
}

/// A running peer proxy (nginx's master and workers, HAProxy's or Caddy's one process).
#[derive(Debug)]
pub struct PeerProxy {
    /// Which one.
    pub peer: Peer,
    /// The process (nginx's workers are its children).
    pub process: ChildProcess,
    /// Where clients connect.
    pub url: String,
    /// Its version line.
    pub version: String,
}

/// Writes `peer`'s config into `dir/NAME/`, has the proxy check it, starts it in the
/// foreground and waits for its port.
pub fn start_peer(
    peer: Peer,
    bin: &Path,
    backends: &[String],
    hash: PeerHash,
    dir: &Path,
    workers: usize,
) -> Result<PeerProxy, StartError> {
    let name = peer.name();
    let own = dir.join(name);
    std::fs::create_dir_all(own.join("logs"))
        .map_err(|e| failed(format!("create {name} dir"), e))?;
    let port = free_port().map_err(|e| failed("pick a port", e))?;
    let spec = PeerSpec {
        dir: &own,
        port,
        backends,
        hash,
        workers: workers.max(1),
    };
    let conf = own.join(peer.config_name());
    std::fs::write(&conf, peer.config(&spec))
        .map_err(|e| failed(format!("write {}", conf.display()), e))?;
    check_peer_config(peer, bin, &own, &conf)?;
    let log = own.join(peer.log_name());
    let stderr = std::fs::File::create(own.join("stderr.log"))
        .map_err(|e| failed(format!("create {name}'s log"), e))?;
    let mut command = Command::new(bin);
    command
        .args(peer.args(&own, &conf, false))
        .envs(peer.env(&own, spec.workers))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    let mut process = ChildProcess::spawn(name, command, Some(log))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    process.wait_for_port(addr, Duration::from_secs(10))?;
    Ok(PeerProxy {
        peer,
        process,
        url: format!("ws://{addr}/"),
        version: peer.version(bin),
    })
}

/// Has `peer` check `conf` (`nginx -t`, `haproxy -c`, `caddy validate`).
pub fn check_peer_config(
    peer: Peer,
    bin: &Path,
    dir: &Path,
    conf: &Path,
) -> Result<(), StartError> {
    let what = format!("{} config check", peer.name());
    let output = Command::new(bin)
        .args(peer.args(dir, conf, true))
        .envs(peer.env(dir, 1))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| failed(&what, e))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(failed(
            what,
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        ))
    }
}

/// Where the harness looks for the relay binary and examples: the directory of its own
/// executable (`target/release/` for `target/release/wsrelay-loadtest`).
pub fn sibling(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    // Test binaries live in target/<profile>/deps.
    let dir = if dir.ends_with("deps") {
        dir.parent()?
    } else {
        dir
    };
    let candidate = dir.join(name);
    candidate.is_file().then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_config_parses_with_the_relay() {
        let spec = RelaySpec {
            mode: RelayMode::PerClient,
            backends: vec!["ws://127.0.0.1:9001/".into(), "ws://127.0.0.1:9002/".into()],
            hash_key: "remote_addr".into(),
            max_message: 64,
            reuse_port: false,
        };
        let text = relay_config(&spec, 8080);
        let config = wsrelay::config::Config::from_toml(&text, "test").unwrap();
        assert_eq!(config.listen_addr().port(), 8080);
        assert!(!config.server.reuse_port);
        let shared = relay_config(
            &RelaySpec {
                reuse_port: true,
                ..spec
            },
            8080,
        );
        let config = wsrelay::config::Config::from_toml(&shared, "test").unwrap();
        assert!(config.server.reuse_port);
    }

    static BACKENDS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        vec!["ws://127.0.0.1:9001/".into(), "ws://127.0.0.1:9002/".into()]
    });

    fn spec(dir: &Path, hash: PeerHash) -> PeerSpec<'_> {
        PeerSpec {
            dir,
            port: 8081,
            backends: &BACKENDS,
            hash,
            workers: 1,
        }
    }

    #[test]
    fn nginx_config_is_the_classic_one() {
        let text = nginx_config(&spec(Path::new("/tmp/x"), PeerHash::ClientAddress));
        for needle in [
            "proxy_http_version 1.1;",
            "proxy_set_header Upgrade $http_upgrade;",
            "hash $remote_addr consistent;",
            "server 127.0.0.1:9001;",
            "server 127.0.0.1:9002;",
            "proxy_read_timeout 3600s;",
            "master_process on;",
            "worker_processes 1;",
            "daemon off;",
            "listen 127.0.0.1:8081;",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        let rooms = nginx_config(&spec(Path::new("/tmp/x"), PeerHash::RoomParameter));
        assert!(rooms.contains("hash $arg_room consistent;"), "{rooms}");
    }

    #[test]
    fn haproxy_config_hashes_consistently_and_tunnels() {
        let mut s = spec(Path::new("/tmp/x"), PeerHash::ClientAddress);
        s.workers = 3;
        let text = haproxy_config(&s);
        for needle in [
            "nbthread 3",
            "mode http",
            "timeout tunnel 3600s",
            "bind 127.0.0.1:8081",
            "balance source",
            "hash-type consistent",
            "server b0 127.0.0.1:9001",
            "server b1 127.0.0.1:9002",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        let rooms = haproxy_config(&spec(Path::new("/tmp/x"), PeerHash::RoomParameter));
        assert!(rooms.contains("balance url_param room"), "{rooms}");
    }

    #[test]
    fn caddy_config_hashes_the_client_address_on_loopback() {
        let text = caddy_config(&spec(Path::new("/tmp/x"), PeerHash::ClientAddress));
        for needle in [
            "admin off",
            "auto_https off",
            "http://127.0.0.1:8081 {",
            "bind 127.0.0.1",
            "reverse_proxy 127.0.0.1:9001 127.0.0.1:9002 {",
            "lb_policy ip_hash",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        let rooms = caddy_config(&spec(Path::new("/tmp/x"), PeerHash::RoomParameter));
        assert!(rooms.contains("lb_policy uri_hash"), "{rooms}");
    }

    /// Each installed peer accepts the config the harness writes for it (`nginx -t`,
    /// `haproxy -c`, `caddy validate`); an absent one is skipped, and says so.
    #[test]
    fn installed_peers_accept_their_configs() {
        for peer in Peer::ALL {
            let Some(bin) = peer.find(None) else {
                eprintln!("SKIPPED: {}: {}", peer.name(), peer.missing());
                continue;
            };
            for hash in [PeerHash::ClientAddress, PeerHash::RoomParameter] {
                let temp = TempDir::new(false).unwrap();
                let dir = temp.path().join(peer.name());
                std::fs::create_dir_all(dir.join("logs")).unwrap();
                let mut s = spec(&dir, hash);
                s.port = free_port().unwrap();
                let conf = dir.join(peer.config_name());
                std::fs::write(&conf, peer.config(&s)).unwrap();
                if let Err(error) = check_peer_config(peer, &bin, &dir, &conf) {
                    panic!("{}: {error}\n{}", peer.name(), peer.config(&s));
                }
            }
        }
    }
}
