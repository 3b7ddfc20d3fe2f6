//! The signals the relay answers: SIGTERM and SIGINT drain and stop, SIGHUP reloads.

use anyhow::{Context, Result};
use wsrelay::RelayHandle;

/// SIGTERM and SIGINT (drain and stop) and SIGHUP (reload the config file; without one, it is
/// logged and ignored rather than killing the process as its default action would).
pub struct ShutdownSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Installs the handlers; do it before binding, so a signal that arrives meanwhile drains
    /// rather than kills.
    pub fn install() -> Result<ShutdownSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(ShutdownSignals {
            terminate: signal(SignalKind::terminate()).context("install SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("install SIGINT handler")?,
            hangup: signal(SignalKind::hangup()).context("install SIGHUP handler")?,
        })
    }

    /// Waits for SIGTERM or SIGINT; reloads `relay`'s config file on SIGHUP.
    pub async fn wait(mut self, relay: Option<&RelayHandle>) {
        loop {
            tokio::select! {
                _ = self.terminate.recv() => break,
                _ = self.interrupt.recv() => break,
                _ = self.hangup.recv() => match reload(relay).await {
                    Some(Ok(report)) => tracing::info!(%report, "SIGHUP: configuration reloaded"),
                    Some(Err(error)) => {
                        tracing::error!(%error, "SIGHUP: reload refused; the running configuration stays");
                    }
                    None => tracing::warn!("SIGHUP: nothing to reload here"),
                },
            }
        }
        tracing::info!("shutdown signal received");
    }
}

/// Reloads `relay`'s file, if there is a relay.
async fn reload(
    relay: Option<&RelayHandle>,
) -> Option<Result<wsrelay::ReloadReport, wsrelay::ReloadError>> {
    Some(relay?.reload_from_file().await)
}
