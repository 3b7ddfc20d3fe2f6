//! The `wsrelay` binary as a child process: its output collected line by line, signals, and
//! bounded waits for it to listen or exit.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::binary::wsrelay_binary;
use crate::wait::{WAIT, wait_until};

/// Lines a child wrote so far on one stream.
type Lines = Arc<Mutex<Vec<String>>>;

fn collect_lines(stream: impl Read + Send + 'static) -> Lines {
    let lines: Lines = Arc::default();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// A running `wsrelay` process; dropping it kills the process, so a failing test leaves no
/// relay behind.
pub struct RelayProcess {
    child: Child,
    stdout: Lines,
    stderr: Lines,
}

impl RelayProcess {
    /// Starts `wsrelay ARGS` with `RUST_LOG=rust_log`, collecting its output lines.
    pub fn spawn(args: &[&str], rust_log: &str) -> RelayProcess {
        RelayProcess::start(Command::new(wsrelay_binary()).args(args), rust_log)
    }

    /// Like [`RelayProcess::spawn`], with at most `files` open file descriptors.
    pub fn spawn_with_file_limit(files: u32, args: &[&str], rust_log: &str) -> RelayProcess {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("ulimit -n {files} && exec \"$0\" \"$@\""))
            .arg(wsrelay_binary())
            .args(args);
        RelayProcess::start(&mut command, rust_log)
    }

    /// Starts `command` with `RUST_LOG=rust_log`, collecting its output lines.
    pub fn start(command: &mut Command, rust_log: &str) -> RelayProcess {
        let mut child = command
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start wsrelay");
        let stdout = collect_lines(child.stdout.take().unwrap());
        let stderr = collect_lines(child.stderr.take().unwrap());
        RelayProcess {
            child,
            stdout,
            stderr,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The lines written to stdout so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// The lines written to stderr so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends the signal `name` (e.g. `TERM`, `HUP`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits until the listener accepts; fails early with the logs if the process died.
    pub async fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + WAIT;
        loop {
            if TcpStream::connect(addr).await.is_ok() {
                return;
            }
            assert!(
                self.is_running(),
                "wsrelay exited before listening: {:?}",
                self.stderr()
            );
            assert!(
                Instant::now() < deadline,
                "wsrelay never listened on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded by [`WAIT`]) for the process to exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "wsrelay did not exit in time: {:?}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a stderr line satisfies `check`.
    pub async fn wait_stderr(&self, what: &str, check: impl Fn(&str) -> bool) {
        wait_until(what, || {
            self.stderr.lock().unwrap().iter().any(|l| check(l))
        })
        .await;
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The resident memory (`VmRSS`) of process `pid`, or of this process with `None`, in bytes.
pub fn resident_bytes(pid: Option<u32>) -> u64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {path}"));
    kib * 1024
}
