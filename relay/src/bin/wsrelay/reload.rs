//! `wsrelay reload`: asks a running relay to reload its config file, over its admin listener
//! (`POST /api/reload`, the same as SIGHUP), and prints what changed or why it was refused.

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Reloads the relay whose admin listener is `admin`, with the admin `token` if it wants one.
pub async fn run(admin: &str, token: Option<&str>) -> Result<()> {
    let tcp = TcpStream::connect(admin).await.map_err(|error| {
        anyhow!(
            "cannot reach the admin listener at {admin}: {error}; is the relay running with `[server] admin = \"{admin}\"`?"
        )
    })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .with_context(|| format!("talk HTTP to {admin}"))?;
    let driver = tokio::spawn(connection);
    let mut request = Request::post("/api/reload").header("host", admin);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = sender
        .send_request(request.body(Empty::<Bytes>::new())?)
        .await
        .with_context(|| format!("POST /api/reload to {admin}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .with_context(|| format!("read the answer of {admin}"))?
        .to_bytes();
    driver.abort();
    let text = String::from_utf8_lossy(&body).trim().to_owned();
    match status {
        StatusCode::OK => {
            println!("{}", describe(&text));
            Ok(())
        }
        StatusCode::UNAUTHORIZED => {
            bail!("{admin} wants the admin token: give --token (or WSRELAY_ADMIN_TOKEN)")
        }
        StatusCode::NOT_FOUND => bail!(
            "{admin} has no /api/reload: is it the relay's admin listener (`[server] admin`), not its client listener?"
        ),
        _ => bail!(
            "the relay refused the reload (HTTP {status}); the running configuration stays:\n{text}"
        ),
    }
}

/// One readable summary of a reload report (`{added, removed, routes, restart_needed,
/// listener_certificate}`).
fn describe(report: &str) -> String {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(report) else {
        return report.to_owned();
    };
    let list = |key: &str| {
        let items: Vec<&str> = value[key]
            .as_array()
            .map(|items| items.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        if items.is_empty() {
            "none".to_owned()
        } else {
            items.join(", ")
        }
    };
    let mut line = format!(
        "reloaded: {} routes; backends added: {}; removed: {}",
        value["routes"].as_u64().unwrap_or(0),
        list("added"),
        list("removed")
    );
    // Said only for a listener with TLS, whose operator may be rotating its certificate.
    let certificate = serde_json::from_value::<wsrelay::ListenerCertificate>(
        value["listener_certificate"].clone(),
    );
    if let Ok(certificate) = certificate
        && certificate != wsrelay::ListenerCertificate::NoTls
    {
        line.push_str(&format!("\nlistener certificate: {certificate}"));
    }
    if value["restart_needed"]
        .as_array()
        .is_some_and(|keys| !keys.is_empty())
    {
        line.push_str(&format!(
            "\nstill needs a restart to apply: {}",
            list("restart_needed")
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[test]
    fn the_summary_says_what_became_of_a_tls_listeners_certificate() {
        let report = |certificate: &str| {
            format!(
                r#"{{"added":[],"removed":[],"routes":1,"restart_needed":[],"listener_certificate":"{certificate}"}}"#
            )
        };
        assert_eq!(
            describe(&report("no_tls")),
            "reloaded: 1 routes; backends added: none; removed: none"
        );
        assert!(
            describe(&report("changed")).ends_with(
                "\nlistener certificate: re-read, changed: new handshakes get the new one"
            ),
            "{}",
            describe(&report("changed"))
        );
        assert!(
            describe(&report("unchanged")).ends_with("\nlistener certificate: re-read, unchanged")
        );
        // An older relay's answer, without the field, is summed up as before.
        assert_eq!(
            describe(r#"{"added":[],"removed":[],"routes":2,"restart_needed":[]}"#),
            "reloaded: 2 routes; backends added: none; removed: none"
        );
    }
}
