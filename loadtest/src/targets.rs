//! The processes `compare` starts and always stops: backends, the relay (per-client and mux),
//! nginx, each in a temporary directory of its own.
//!
//! Every child runs in its own process group with `PR_SET_PDEATHSIG = SIGKILL`, so it dies with
//! the harness even if the harness is killed outright; normally [`ChildProcess`]'s `Drop` sends
//! SIGTERM to the group, waits up to two seconds, then SIGKILLs it. Nothing here touches a
//! system service: nginx runs from a config and prefix in the temp directory, as a child.

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
    let stdout = process.child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(10)).map_err(|_| {
        let why = process
            .exited()
            .unwrap_or_else(|| "no `listening on` line within 10s".into());
        failed(format!("start {name}"), why)
    })?;
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .ok_or_else(|| {
            failed(
                format!("start {name}"),
                format!("unexpected output {line:?}"),
            )
        })?
        .to_owned();
    Ok(Backend { process, url })
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
}

/// The relay config file for `spec` listening on `port`.
pub fn relay_config(spec: &RelaySpec, port: u16) -> String {
    let backends: Vec<String> = spec.backends.iter().map(|b| format!("{b:?}")).collect();
    let (mode, links) = match spec.mode {
        RelayMode::PerClient => ("per-client", ""),
        RelayMode::Mux => ("mux", "mux_links = 2\n"),
    };
    let size = spec.max_message.max(1 << 20);
    format!(
        "# written by wsrelay-loadtest\n\
         [server]\nlisten = \"127.0.0.1:{port}\"\nmax_connections = 200000\n\
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
            .arg(&config)
            .env("RUST_LOG", self.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        if let Some(n) = self.workers {
            command.env("TOKIO_WORKER_THREADS", n.to_string());
        }
        let mut process = ChildProcess::spawn(name, command, Some(log_path))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        process.wait_for_port(addr, Duration::from_secs(15))?;
        Ok(Relay {
            process,
            url: format!("ws://{addr}/"),
        })
    }
}

/// Finds nginx: the given path, else `nginx` on PATH, else `/usr/sbin/nginx`.
pub fn find_nginx(given: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = given {
        return path.exists().then(|| path.to_owned());
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nginx"))
            .find(|candidate| candidate.is_file())
    });
    on_path.or_else(|| {
        let sbin = PathBuf::from("/usr/sbin/nginx");
        sbin.is_file().then_some(sbin)
    })
}

/// `nginx -v`'s answer.
pub fn nginx_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// nginx configured as in the classic WebSocket proxying guide: HTTP/1.1 to the upstream,
/// Upgrade and Connection headers passed, `hash $remote_addr consistent`, long read timeout.
/// Master process on, one worker (`workers` overrides), everything under `dir`.
pub fn nginx_config(
    dir: &Path,
    port: u16,
    backends: &[String],
    hash: &str,
    workers: usize,
) -> String {
    let servers: String = backends
        .iter()
        .map(|b| {
            let host = b
                .trim_start_matches("ws://")
                .trim_end_matches('/')
                .to_owned();
            format!("        server {host};\n")
        })
        .collect();
    let d = dir.display();
    format!(
        "# written by wsrelay-loadtest: the classic WebSocket reverse-proxy setup\n\
         daemon off;\nmaster_process on;\nworker_processes {workers};\n\
         worker_rlimit_nofile 20000;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\n\
         events {{\n    worker_connections 19000;\n}}\n\n\
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

/// A running nginx (master and workers).
#[derive(Debug)]
pub struct Nginx {
    /// The master process (its workers are its children).
    pub process: ChildProcess,
    /// Where clients connect.
    pub url: String,
    /// `nginx -v`.
    pub version: String,
}

/// Writes the config, tests it (`nginx -t`), starts nginx in the foreground and waits for its
/// port.
pub fn start_nginx(
    bin: &Path,
    backends: &[String],
    hash: &str,
    dir: &Path,
    workers: usize,
) -> Result<Nginx, StartError> {
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs")).map_err(|e| failed("create nginx dir", e))?;
    let port = free_port().map_err(|e| failed("pick a port", e))?;
    let conf = prefix.join("nginx.conf");
    std::fs::write(&conf, nginx_config(&prefix, port, backends, hash, workers))
        .map_err(|e| failed("write nginx.conf", e))?;
    let error_log = prefix.join("error.log");
    let args = |command: &mut Command| {
        command
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(&error_log);
    };
    let mut test = Command::new(bin);
    args(&mut test);
    let output = test
        .arg("-t")
        .output()
        .map_err(|e| failed("run nginx -t", e))?;
    if !output.status.success() {
        return Err(failed(
            "nginx -t",
            String::from_utf8_lossy(&output.stderr).trim(),
        ));
    }
    let mut command = Command::new(bin);
    args(&mut command);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut process = ChildProcess::spawn("nginx", command, Some(error_log))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    process.wait_for_port(addr, Duration::from_secs(10))?;
    Ok(Nginx {
        process,
        url: format!("ws://{addr}/"),
        version: nginx_version(bin),
    })
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
        };
        let text = relay_config(&spec, 8080);
        let config = wsrelay::config::Config::from_toml(&text, "test").unwrap();
        assert_eq!(config.listen_addr().port(), 8080);
    }

    #[test]
    fn nginx_config_is_the_classic_one() {
        let text = nginx_config(
            Path::new("/tmp/x"),
            8081,
            &["ws://127.0.0.1:9001/".into()],
            "$remote_addr",
            1,
        );
        for needle in [
            "proxy_http_version 1.1;",
            "proxy_set_header Upgrade $http_upgrade;",
            "hash $remote_addr consistent;",
            "server 127.0.0.1:9001;",
            "proxy_read_timeout 3600s;",
            "master_process on;",
            "daemon off;",
            "listen 127.0.0.1:8081;",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
