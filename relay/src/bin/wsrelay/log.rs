//! Where the relay's log goes: stderr, written by a thread of its own. A session that logs
//! appends its line to a buffer in memory; the thread writes what gathered every
//! [`FLUSH_EVERY`] (sooner once [`BATCH`] bytes wait), in one write, like nginx's
//! `access_log ... buffer= flush=`. So no session waits for stderr, and a busy relay spends one
//! write on many lines instead of one on each.
//!
//! A channel with a waiting reader (tracing-appender's `non_blocking`) was tried first: waking
//! its thread for every line cost more CPU and syscalls per connection than the writes it saved.

use std::io::{self, IsTerminal, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::cli::LogFormat;

/// Longest a line waits in memory before it is written.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Bytes waiting that are written at once, without waiting for [`FLUSH_EVERY`].
const BATCH: usize = 64 * 1024;
/// Bytes that may wait while stderr does not keep up; lines beyond it are dropped and counted.
const MAX_WAITING: usize = 8 * 1024 * 1024;

/// Logs to stderr, filtered by `RUST_LOG` (`info` by default); colour only on a terminal, so
/// a log file holds plain text. The returned [`Log`] must live until the end of `main`.
pub fn init(format: LogFormat) -> Log {
    let log = Log::start(io::stderr());
    let directives = std::env::var("RUST_LOG").unwrap_or_default();
    match filter_for(&directives) {
        Filter::Targets(targets) => install(targets, format, &log),
        Filter::Spans(env_filter) => install(env_filter, format, &log),
    }
    log
}

/// The filter `RUST_LOG` asks for.
#[expect(clippy::large_enum_variant, reason = "made once, at start")]
enum Filter {
    /// Levels by target: checked once per call site and cached by `tracing`, nothing per span.
    Targets(Targets),
    /// Directives that name spans or fields (`[span{field=value}]`), which only `EnvFilter`
    /// understands. It takes a lock each time any span is entered or left, and every session
    /// enters its span at each wakeup: about 1% of the relay's CPU at 64-byte messages, so
    /// it is kept for the directives that need it.
    Spans(EnvFilter),
}

/// `directives` as the cheapest filter that understands them: `Targets` for levels by target,
/// `EnvFilter` for anything else it accepts; `info` when empty or understood by neither.
fn filter_for(directives: &str) -> Filter {
    let directives = directives.trim();
    let info = || Filter::Targets(Targets::new().with_default(LevelFilter::INFO));
    if directives.is_empty() {
        return info();
    }
    if !directives.contains(['[', '{'])
        && let Ok(targets) = directives.parse::<Targets>()
    {
        return Filter::Targets(targets);
    }
    EnvFilter::try_new(directives).map_or_else(|_| info(), Filter::Spans)
}

/// Sets the global subscriber: `filter`, then the `format` lines written through `log`.
fn install<F>(filter: F, format: LogFormat, log: &Log)
where
    F: Layer<Registry> + Send + Sync + 'static,
{
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(log.writer())
        .with_ansi(io::stderr().is_terminal());
    let subscriber = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => subscriber.with(lines).init(),
        LogFormat::Json => subscriber
            .with(lines.json().flatten_event(true).with_current_span(true))
            .init(),
    }
}

/// The log's writing thread, owned by `main`. Finishing it (or dropping it, also while a panic
/// unwinds) writes out every line still waiting; lines logged after that go to stderr at once.
pub struct Log {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What the sessions that log and the writing thread share.
struct Shared {
    state: Mutex<State>,
    /// Wakes the writing thread: the first line after a write, a full batch, the finish.
    wake: Condvar,
}

struct State {
    /// Lines not yet written, whole.
    waiting: Vec<u8>,
    /// Lines dropped because [`MAX_WAITING`] bytes were waiting.
    dropped: u64,
    /// Set by the finish: the thread writes what waits and ends; later lines are written
    /// directly.
    finished: bool,
}

/// A [`MakeWriter`] for `tracing_subscriber`: each event's formatted line is one `write`.
#[derive(Clone)]
struct LogWriter(Arc<Shared>);

impl Log {
    /// Starts the thread that writes to `out`.
    fn start<W: Write + Send + 'static>(out: W) -> Log {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                waiting: Vec::with_capacity(BATCH),
                dropped: 0,
                finished: false,
            }),
            wake: Condvar::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("wsrelay-log".into())
                .spawn(move || shared.write_until_finished(out))
                .expect("start the log thread")
        };
        Log {
            shared,
            thread: Some(thread),
        }
    }

    fn writer(&self) -> LogWriter {
        LogWriter(self.shared.clone())
    }

    /// Writes out every line still waiting, then says how many were dropped, if any.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.lock().finished = true;
        self.shared.wake.notify_one();
        let _ = thread.join();
        let dropped = self.shared.lock().dropped;
        if dropped > 0 {
            eprintln!("wsrelay: {dropped} log lines dropped: stderr did not keep up");
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves whole lines behind: keep logging.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The writing thread: sleeps until a line arrives, gathers for up to [`FLUSH_EVERY`] or
    /// a [`BATCH`], writes it all at once; until the finish, after which it writes the rest.
    fn write_until_finished<W: Write>(&self, mut out: W) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let mut state = self.lock();
            while state.waiting.is_empty() && !state.finished {
                state = self.wake.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            let due = Instant::now() + FLUSH_EVERY;
            while !state.finished && state.waiting.len() < BATCH {
                let left = due.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                state = self
                    .wake
                    .wait_timeout(state, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            std::mem::swap(&mut state.waiting, &mut batch);
            let finished = state.finished;
            drop(state);
            // Nowhere to report a failed write to: the log is where it would go.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            if finished {
                return;
            }
        }
    }
}

impl Write for &Shared {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut state = self.lock();
        if state.finished {
            drop(state);
            return io::stderr().write(line);
        }
        let before = state.waiting.len();
        if before + line.len() > MAX_WAITING {
            state.dropped += 1;
            return Ok(line.len());
        }
        state.waiting.extend_from_slice(line);
        let after = state.waiting.len();
        drop(state);
        // Only the first line of a batch and a full batch wake the thread: a wake is a
        // syscall, which is what gathering the lines saves.
        if before == 0 || (before < BATCH && after >= BATCH) {
            self.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = &'a Shared;

    fn make_writer(&'a self) -> Self::Writer {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(directives: &str) -> Targets {
        match filter_for(directives) {
            Filter::Targets(targets) => targets,
            Filter::Spans(_) => panic!("{directives:?} needs no EnvFilter"),
        }
    }

    #[test]
    fn levels_by_target_get_the_plain_filter() {
        use tracing::Level;
        let default = targets("");
        assert!(default.would_enable("wsrelay::session", &Level::INFO));
        assert!(!default.would_enable("wsrelay::session", &Level::DEBUG));

        let frames = targets("info,wsrelay::inspect=debug");
        assert!(frames.would_enable("wsrelay::inspect::log", &Level::DEBUG));
        assert!(!frames.would_enable("wsrelay::session", &Level::DEBUG));

        let quiet = targets("warn");
        assert!(!quiet.would_enable("wsrelay::session", &Level::INFO));
        assert!(quiet.would_enable("wsrelay", &Level::WARN));
    }

    #[test]
    fn span_directives_get_env_filter_and_nonsense_gets_info() {
        assert!(matches!(
            filter_for("info,wsrelay[conn{id=7}]=debug"),
            Filter::Spans(_)
        ));
        let fallback = targets("this is=not a=filter=");
        assert!(fallback.would_enable("wsrelay", &tracing::Level::INFO));
        assert!(!fallback.would_enable("wsrelay", &tracing::Level::DEBUG));
    }

    /// A writer whose bytes the test reads back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn finishing_writes_every_waiting_line_in_order() {
        let out = Captured::default();
        let log = Log::start(out.clone());
        let writer = log.writer();
        for n in 0..1000 {
            writeln!(writer.make_writer(), "line {n}").unwrap();
        }
        log.finish();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let expected: String = (0..1000).map(|n| format!("line {n}\n")).collect();
        assert_eq!(text, expected);
    }

    #[test]
    fn a_line_is_written_within_the_flush_interval() {
        let out = Captured::default();
        let log = Log::start(out.clone());
        writeln!(log.writer().make_writer(), "soon").unwrap();
        let deadline = Instant::now() + FLUSH_EVERY * 20;
        while out.0.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the line was not written");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"soon\n");
        drop(log);
    }
}
