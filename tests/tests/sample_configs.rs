//! The sample configurations in `examples/` (examples/README.md) stay valid: every `*.toml`
//! there passes `wsrelay check`, run with the real binary as a user would.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use wsrelay_testkit::{workspace_root, wsrelay_binary};

fn workspace() -> &'static Path {
    workspace_root()
}

fn binary() -> &'static Path {
    wsrelay_binary()
}

/// Every `*.toml` file in the repository's `examples/` folder, sorted by name.
fn sample_configs() -> Vec<PathBuf> {
    let dir = workspace().join("examples");
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|error| panic!("read {}: {error}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("read an entry of examples/").path())
        .filter(|path| path.is_file() && path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_sample_config_passes_wsrelay_check() {
    let files = sample_configs();
    let names: Vec<String> = files
        .iter()
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.len() >= 4,
        "expected at least 4 sample configs in examples/, found {names:?}"
    );
    let mut failures = Vec::new();
    for file in &files {
        let output = Command::new(binary())
            .args(["check", "--config"])
            .arg(file)
            .current_dir(workspace())
            .stdin(Stdio::null())
            .output()
            .expect("run wsrelay check");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let ok_line = format!("{}: ok (", file.display());
        if output.status.code() != Some(0) || !stdout.contains(&ok_line) {
            failures.push(format!(
                "{}: exit {:?}\nstdout:\n{stdout}stderr:\n{stderr}",
                file.display(),
                output.status.code()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} sample configs fail `wsrelay check`:\n\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}
