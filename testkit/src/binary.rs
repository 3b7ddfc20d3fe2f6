//! The `wsrelay` binary (and the echo backend example) for tests that run them as users do. `CARGO_BIN_EXE_wsrelay` exists only
//! for tests of the binary's own package, so the testkit builds and finds it itself; building
//! on every test run (not only when missing) keeps tests from exercising a stale binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace's root folder (where `Cargo.toml`, `examples/` and `target/` are).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ lives in the workspace")
}

/// The freshly built debug `wsrelay` binary, built once per test process.
pub fn wsrelay_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| build(&["--bin", "wsrelay"], "wsrelay"))
}

/// The freshly built debug `echo_backend` example (`relay/examples/echo_backend.rs`): a
/// tokio-tungstenite echo server in a process of its own, for tests that kill backends with
/// `kill -9`.
pub fn echo_backend_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| build(&["--example", "echo_backend"], "examples/echo_backend"))
}

/// Builds a target of the `wsrelay` package (`what`: cargo's target selection) and returns
/// its path under `target/debug/`.
fn build(what: &[&str], relative: &str) -> PathBuf {
    let workspace = workspace_root();
    let target = match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir,
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    };
    let binary = target.join("debug").join(relative);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let built = Command::new(cargo)
        .args(["build", "-q", "-p", "wsrelay"])
        .args(what)
        .current_dir(workspace)
        .status();
    match built {
        Ok(status) if status.success() => {}
        other if binary.exists() => {
            eprintln!("cargo build of {relative} failed ({other:?}); using the existing binary")
        }
        other => panic!("cannot build {relative}: {other:?}"),
    }
    assert!(binary.exists(), "{} was not built", binary.display());
    binary
}
