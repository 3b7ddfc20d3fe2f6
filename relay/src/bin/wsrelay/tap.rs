//! `wsrelay tap`: opens a running relay's tap WebSocket on its admin listener and prints each
//! record, saying where it is connected and, when the relay refuses, why and what to try.

use anyhow::{Result, anyhow, bail};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::signals::ShutdownSignals;

/// What to tap and how to print it.
pub struct TapArgs<'a> {
    /// The admin listener's address.
    pub admin: &'a str,
    /// A route's path, or
    pub route: Option<&'a str>,
    /// a connection id.
    pub conn: Option<u64>,
    /// Print raw JSON records.
    pub raw_json: bool,
    /// The admin token.
    pub token: Option<&'a str>,
}

/// Taps until Ctrl-C or until the relay closes the tap.
pub async fn run(args: TapArgs<'_>) -> Result<()> {
    let (filter, what) = match (args.route, args.conn) {
        (_, Some(id)) => (format!("conn={id}"), format!("connection {id}")),
        (Some(route), None) => (
            format!("route={}", encode_query(route)),
            format!("route {route}"),
        ),
        (None, None) => bail!("give --route /path or --conn ID"),
    };
    let admin = args.admin;
    let url = format!("ws://{admin}/api/tap?{filter}");
    let mut request = url.as_str().into_client_request()?;
    if let Some(token) = args.token {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
    }
    let (mut socket, response) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|error| refused(admin, error))?;
    if !response.headers().contains_key("x-wsrelay-tap") {
        bail!(
            "{admin} upgraded, but not to a tap: it is not a relay's admin listener (perhaps the client listener, whose route passed the request to a backend); point --admin at `[server] admin`"
        );
    }
    eprintln!(
        "tapping {what} on the admin listener {admin}; frames that cross the relay follow (Ctrl-C to stop)"
    );
    let signals = ShutdownSignals::install()?;
    let stop = signals.wait(None);
    tokio::pin!(stop);
    loop {
        let message = tokio::select! {
            message = socket.next() => message,
            () = &mut stop => return Ok(()),
        };
        let text = match message {
            None | Some(Ok(Message::Close(_))) => {
                eprintln!("the relay closed the tap");
                return Ok(());
            }
            Some(Err(error)) => bail!("the tap on {admin} broke: {error}"),
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
        };
        if args.raw_json {
            println!("{}", text.as_str());
        } else {
            println!("{}", tap_line(text.as_str()));
        }
    }
}

/// Why the tap could not be opened, in words that say what to try.
fn refused(admin: &str, error: WsError) -> anyhow::Error {
    match error {
        WsError::Http(response) => {
            let status = response.status();
            let body = response
                .body()
                .as_ref()
                .map(|body| String::from_utf8_lossy(body).trim().to_owned())
                .unwrap_or_default();
            match status.as_u16() {
                401 => {
                    anyhow!("{admin} wants the admin token: give --token (or WSRELAY_ADMIN_TOKEN)")
                }
                // The client listener has no tap: its 404 names the path it has no route for.
                404 if body.contains("/api/tap") => anyhow!(
                    "{admin} is not a relay's admin listener (it answered: {body}); point --admin at `[server] admin`"
                ),
                _ if body.is_empty() => anyhow!("{admin} refused the tap: HTTP {status}"),
                _ => anyhow!("{admin} refused the tap: {body}"),
            }
        }
        WsError::Io(error) => anyhow!(
            "cannot reach the admin listener at {admin}: {error}; is the relay running with `[server] admin = \"{admin}\"`?"
        ),
        other => anyhow!("open the tap at {admin}: {other}"),
    }
}

/// One readable line for a tap record: time, connection, direction, opcode, length, preview.
fn tap_line(record: &str) -> String {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(record) else {
        return record.to_owned();
    };
    if let Some(lost) = value.get("dropped") {
        return format!("-- tap fell behind: {lost} records lost --");
    }
    let millis = value["time_ms"].as_u64().unwrap_or(0);
    let seconds = millis / 1000;
    let arrow = match value["direction"].as_str() {
        Some("in") => "client -> backend",
        _ => "backend -> client",
    };
    format!(
        "{:02}:{:02}:{:02}.{:03} #{:<6} {arrow} {:<6} {:>7} B  {}",
        (seconds / 3600) % 24,
        (seconds / 60) % 60,
        seconds % 60,
        millis % 1000,
        value["conn"].as_u64().unwrap_or(0),
        value["opcode"].as_str().unwrap_or("?"),
        value["len"].as_u64().unwrap_or(0),
        value["preview"].as_str().unwrap_or(""),
    )
}

/// Percent-encodes what a query value can't carry as is.
fn encode_query(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}
