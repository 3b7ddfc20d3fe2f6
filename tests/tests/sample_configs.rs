//! The sample configurations in `examples/` (examples/README.md) stay valid: every `*.toml`
//! there passes `wsrelay check`, run with the real binary as a user would. `check` reads the
//! TLS files a sample names, and the samples ship none (private keys stay out of version
//! control): each sample is checked from a copy in a temporary folder, beside stand-ins for
//! its TLS files made with a test CA (a certificate and its key, a CA file) where it expects
//! them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use wsrelay_testkit::{TempDir, TestCa, workspace_root, wsrelay_binary};

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
        let dir = TempDir::new();
        let copy = dir.path().join(file.file_name().unwrap());
        let source = std::fs::read_to_string(file).unwrap();
        std::fs::write(&copy, &source).unwrap();
        make_tls_files(&source, dir.path());
        let output = Command::new(binary())
            .args(["check", "--config"])
            .arg(&copy)
            .current_dir(workspace())
            .stdin(Stdio::null())
            .output()
            .expect("run wsrelay check");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let ok_line = format!("{}: ok (", copy.display());
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

/// Writes, relative to `dir`, every TLS file `source` names: for each `[server]` and each
/// upstream `tls` table, one certificate issued by a test CA with its key at the
/// certificate's and the key's paths, and the CA at `ca_file`.
fn make_tls_files(source: &str, dir: &Path) {
    let config: toml::Table = toml::from_str(source).expect("a sample parses as TOML");
    let ca = TestCa::new("sample");
    let mut tables: Vec<&toml::Table> = Vec::new();
    if let Some(server) = config.get("server").and_then(toml::Value::as_table) {
        tables.push(server);
    }
    if let Some(upstreams) = config.get("upstream").and_then(toml::Value::as_table) {
        tables.extend(
            upstreams
                .values()
                .filter_map(|upstream| upstream.get("tls")?.as_table()),
        );
    }
    let place = |name: Option<&toml::Value>, from: &Path| {
        if let Some(path) = name.and_then(toml::Value::as_str) {
            let target = dir.join(path);
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::copy(from, target).unwrap();
        }
    };
    for (number, table) in tables.into_iter().enumerate() {
        let issued = ca.issue(&format!("sample-{number}"), &["localhost"]);
        place(table.get("tls_cert"), &issued.cert_path);
        place(table.get("tls_key"), &issued.key_path);
        place(table.get("client_cert"), &issued.cert_path);
        place(table.get("client_key"), &issued.key_path);
        place(table.get("ca_file"), &ca.ca_path());
    }
}
