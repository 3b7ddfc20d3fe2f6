//! The backends of a scale run: mux echo servers that record, for every stream a relay opens
//! on them, its routing key (`key=` in the stream's query) and the mux link it came on (the
//! link's peer address, which the harness maps to a relay process). What they record is the
//! routing as the backends saw it, whatever the relays believe they did.
//!
//! Each runs as a process of its own (`wsrelay-loadtest scale-backend --listen ADDR`, so its
//! CPU and memory are not the harness's) and talks over its pipes:
//!
//! ```text
//! stdout: listening on ws://ADDR/       first, once it accepts links
//! stdin:  report                        -> stdout: one JSON line, the Records so far
//! stdin ends (the harness is gone)      -> it exits
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::backend::mux_echo;
use crate::scenario::hold::KEY_PARAM;
use crate::targets::{ChildLines, ChildProcess, StartError, listening_url};

/// Streams a backend saw opened: key -> link peer (a relay's end of a mux link) -> streams.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Records {
    /// Streams by key, then by the link they came on. Streams without a key are under `""`.
    pub keys: BTreeMap<String, BTreeMap<SocketAddr, u64>>,
}

impl Records {
    /// Counts one stream with `key` that came on the link from `peer`.
    pub fn record(&mut self, key: &str, peer: SocketAddr) {
        *self
            .keys
            .entry(key.to_owned())
            .or_default()
            .entry(peer)
            .or_default() += 1;
    }

    /// Streams recorded.
    pub fn streams(&self) -> u64 {
        self.keys.values().flat_map(|peers| peers.values()).sum()
    }
}

/// The value of `key` in a query string (`a=1&key=K` -> `K`); `""` when there is none.
pub fn key_of(query: &str) -> &str {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(KEY_PARAM)?.strip_prefix('='))
        .unwrap_or("")
}

/// The backend process's side: serves mux links on `listen`, recording every stream, and
/// answers `report` on stdin until stdin ends.
pub async fn serve(listen: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    say(&format!("listening on ws://{}/", listener.local_addr()?))?;
    let records = Arc::new(Mutex::new(Records::default()));
    let (_stop, stopped) = watch::channel(false);
    let recording = Arc::clone(&records);
    tokio::spawn(mux_echo(listener, stopped, move |conn| {
        lock(&recording).record(key_of(conn.query()), conn.link_peer());
    }));
    let mut commands = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(command) = commands.next_line().await? {
        if command.trim() == "report" {
            let snapshot = lock(&records).clone();
            say(&serde_json::to_string(&snapshot).map_err(std::io::Error::other)?)?;
        }
    }
    // stdin ended: the harness is done with us (or gone). Dropping `_stop` ends the server.
    Ok(())
}

fn lock(records: &Mutex<Records>) -> std::sync::MutexGuard<'_, Records> {
    records.lock().unwrap_or_else(|e| e.into_inner())
}

/// One line to stdout, flushed (the harness waits for it).
fn say(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// Why a recording backend's records could not be had.
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    /// Writing the request failed: the backend is gone.
    #[error("ask {name} for its records: {error}")]
    Ask {
        /// The backend.
        name: String,
        /// The pipe's error.
        error: std::io::Error,
    },
    /// No answer in time, or the backend exited.
    #[error("{name} did not report its records within {timeout:?}")]
    NoAnswer {
        /// The backend.
        name: String,
        /// How long it was given.
        timeout: Duration,
    },
    /// The answer was not the JSON of [`Records`].
    #[error("{name} answered something else than its records: {error}")]
    Garbled {
        /// The backend.
        name: String,
        /// The JSON error.
        error: serde_json::Error,
    },
}

/// The harness's side: a running recording backend.
#[derive(Debug)]
pub struct RecordingBackend {
    process: ChildProcess,
    lines: ChildLines,
    stdin: ChildStdin,
    /// Its `ws://` URL.
    pub url: String,
    /// Where it listens (what the relays' link sockets are connected to).
    pub addr: SocketAddr,
}

impl RecordingBackend {
    /// Starts `exe scale-backend` on a free port of 127.0.0.1 and waits until it listens.
    pub fn start(exe: &Path, index: usize) -> Result<RecordingBackend, StartError> {
        let mut command = Command::new(exe);
        command
            .arg("scale-backend")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut process =
            ChildProcess::spawn(&format!("recording backend {index}"), command, None)?;
        let lines = ChildLines::take(&mut process);
        let url = listening_url(&mut process, &lines)?;
        let what = format!("start {}", process.name());
        let unexpected = |reason: String| StartError::Failed {
            what: what.clone(),
            reason,
        };
        let addr = url
            .trim_start_matches("ws://")
            .trim_end_matches('/')
            .parse()
            .map_err(|_| unexpected(format!("it listens on {url}, not on an IP:PORT")))?;
        let stdin = process
            .take_stdin()
            .ok_or_else(|| unexpected("no stdin".into()))?;
        Ok(RecordingBackend {
            process,
            lines,
            stdin,
            url,
            addr,
        })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// `Some(description)` if it has exited.
    pub fn exited(&mut self) -> Option<String> {
        self.process.exited()
    }

    /// What it has recorded so far, within `timeout`.
    pub async fn records(&mut self, timeout: Duration) -> Result<Records, RecordsError> {
        let name = self.process.name().to_owned();
        let asked = self
            .stdin
            .write_all(b"report\n")
            .and_then(|()| self.stdin.flush());
        if let Err(error) = asked {
            return Err(RecordsError::Ask { name, error });
        }
        let Some(line) = self.lines.next_async(timeout).await else {
            return Err(RecordsError::NoAnswer { name, timeout });
        };
        serde_json::from_str(&line).map_err(|error| RecordsError::Garbled { name, error })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_key_in_a_query() {
        assert_eq!(key_of("key=17"), "17");
        assert_eq!(key_of("a=1&key=x&b=2"), "x");
        assert_eq!(key_of("keys=1&key=2"), "2");
        assert_eq!(key_of("monkey=1"), "");
        assert_eq!(key_of(""), "");
    }

    #[test]
    fn counts_streams_by_key_and_link() {
        let a: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let mut records = Records::default();
        records.record("1", a);
        records.record("1", a);
        records.record("1", b);
        records.record("2", b);
        assert_eq!(records.streams(), 4);
        assert_eq!(records.keys["1"][&a], 2);
        let json = serde_json::to_string(&records).unwrap();
        assert_eq!(serde_json::from_str::<Records>(&json).unwrap(), records);
    }
}
