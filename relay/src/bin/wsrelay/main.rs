//! The `wsrelay` command: a thin CLI over the library. `cli` says what each command takes,
//! `signals` how the process stops and reloads, `log` where its log goes, `trim` when freed heap
//! goes back to the system, `tap` and `demo` are commands of their own.

mod cli;
mod demo;
mod log;
mod reload;
mod signals;
mod tap;
mod trim;

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Parser;
use wsrelay::config::Config;
use wsrelay::{Relay, RelayError};

use cli::{Cli, Command, RunArgs};
use signals::ShutdownSignals;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = log::init(cli.log_format);
    let outcome = match &cli.command {
        Some(Command::Check { config }) => check(config),
        Some(Command::Demo {
            listen,
            tls_cert,
            tls_key,
        }) => {
            let tls = tls_cert.clone().zip(tls_key.clone());
            runtime().and_then(|rt| rt.block_on(demo::run(*listen, tls)))
        }
        Some(Command::Reload { admin, token }) => {
            runtime().and_then(|rt| rt.block_on(reload::run(admin, token.as_deref())))
        }
        Some(Command::Tap {
            admin,
            route,
            conn,
            json,
            token,
        }) => runtime().and_then(|rt| {
            rt.block_on(tap::run(tap::TapArgs {
                admin,
                route: route.as_deref(),
                conn: *conn,
                raw_json: *json,
                token: token.as_deref(),
            }))
        }),
        None => runtime().and_then(|rt| rt.block_on(run(&cli.run))),
    };
    // Every line logged so far reaches stderr before the process says anything else.
    log.finish();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("wsrelay: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

fn config_from_cli(run: &RunArgs) -> Result<Config> {
    match (&run.config, run.backends.is_empty()) {
        (Some(path), _) => Ok(Config::from_toml(
            &read(path)?,
            &path.display().to_string(),
        )?),
        (None, false) => {
            let listen = run
                .listen
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080)));
            Ok(Config::quick_start(listen, &run.backends)?)
        }
        (None, true) => bail!(
            "nothing to relay to: give --config wsrelay.toml, or --backend ws://HOST:PORT (repeatable), or try `wsrelay demo`"
        ),
    }
}

/// `wsrelay check`: every problem of the file, each with its line and the line itself; the TLS
/// files it names are read too, once the file itself is sound.
fn check(path: &Path) -> Result<()> {
    let source = read(path)?;
    let name = path.display().to_string();
    let loaded = Config::from_toml(&source, &name)
        .and_then(|config| config.check_files(path.parent(), &name).map(|()| config));
    let error = match loaded {
        Ok(config) => {
            let plural = |n: usize| if n == 1 { "" } else { "s" };
            let (routes, upstreams) = (config.routes.len(), config.upstreams.len());
            println!(
                "{name}: ok ({routes} route{}, {upstreams} upstream{})",
                plural(routes),
                plural(upstreams)
            );
            return Ok(());
        }
        Err(error) => error,
    };
    let lines: Vec<&str> = source.lines().collect();
    for problem in &error.problems {
        println!("{name}:{problem}");
        if let Some((number, text)) = problem
            .line
            .and_then(|n| Some((n, lines.get(n.checked_sub(1)?)?)))
        {
            println!("    {number:>4} | {text}");
        }
    }
    let count = error.problems.len();
    bail!(
        "{count} problem{} in {name}",
        if count == 1 { "" } else { "s" }
    )
}

/// Says what to do when the listen address is taken.
pub(crate) fn explain_bind(error: RelayError, instead: &str) -> anyhow::Error {
    let in_use = matches!(&error, RelayError::Bind { error, .. } if error.kind() == std::io::ErrorKind::AddrInUse);
    if in_use {
        anyhow::anyhow!(
            "{error}: another program listens there; stop it, or listen elsewhere, e.g. `{instead}`"
        )
    } else {
        error.into()
    }
}

async fn run(run: &RunArgs) -> Result<()> {
    let config = config_from_cli(run)?;
    // Handlers first: a signal that arrives while binding must drain, not kill.
    let signals = ShutdownSignals::install()?;
    let mut builder = Relay::builder(config);
    if let Some(path) = &run.config {
        builder = builder.config_path(path);
    }
    // With a file, `--listen` overrides it now and after every reload.
    if let (Some(_), Some(listen)) = (&run.config, run.listen) {
        builder = builder.listen(listen);
    }
    let relay = builder
        .bind()
        .await
        .map_err(|error| explain_bind(error, "wsrelay --listen 127.0.0.1:8081 ..."))?;
    tokio::select! {
        () = signals.wait(Some(&relay)) => {}
        () = trim::watch(&relay) => {}
    }
    let report = relay.shutdown().await;
    if report.sessions_aborted > 0 {
        tracing::warn!(
            aborted = report.sessions_aborted,
            "some sessions outlived the grace period"
        );
    }
    Ok(())
}
