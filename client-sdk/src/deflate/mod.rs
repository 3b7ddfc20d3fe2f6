//! `permessage-deflate` (RFC 7692) for a [`Client`](crate::Client): what to offer
//! ([`Deflate`]), what the server agreed to ([`Negotiated`]), why an answer is refused
//! ([`ExtensionError`]), and the socket a compressed connection runs on ([`DeflateStream`]).
//!
//! tungstenite fails every frame with RSV1 set, so a compressed connection is a
//! [yawc](https://docs.rs/yawc) WebSocket instead, behind [`DeflateStream`], which reads and
//! writes the same tungstenite [`Message`](tungstenite::Message)s: everything above the socket
//! (heartbeat, queueing, close codes) is the same either way. The handshake itself stays
//! tungstenite's, so HTTP refusals, subprotocols and `Sec-WebSocket-Accept` are checked as
//! on an uncompressed dial; only the answer's `Sec-WebSocket-Extensions` is read here.

pub mod header;
mod rewind;
mod socket;

use std::fmt;

pub(crate) use rewind::Rewind;
pub use socket::DeflateStream;

/// The extension's registered name.
pub const PERMESSAGE_DEFLATE: &str = "permessage-deflate";

/// The smallest window this side can compress with: zlib refuses a raw deflate stream with
/// 8 bits, and one made with 9 may refer further back than a server that asked for 8 keeps.
const SMALLEST_CLIENT_WINDOW: u8 = 9;

/// What a [`Client`](crate::Client) offers when it asks for `permessage-deflate`
/// ([`ClientBuilder::deflate`](crate::ClientBuilder::deflate)).
///
/// The default is what browsers offer, `permessage-deflate; client_max_window_bits`: the
/// server may compress as it likes and may limit the client's window. Each setting below adds
/// a parameter to the offer. A server that does not support the extension answers without it
/// and the connection is uncompressed; one whose answer the client can't honour fails the
/// dial with [`ConnectError::Extension`](crate::ConnectError::Extension).
///
/// ```
/// use wsrelay_client::Deflate;
///
/// // Neither side keeps a compression context between messages: less memory on both ends
/// // (the relay's `compression = "client"` answers this way whatever is offered).
/// let deflate = Deflate::default()
///     .server_no_context_takeover()
///     .client_no_context_takeover();
/// assert_eq!(
///     deflate.offer(),
///     "permessage-deflate; server_no_context_takeover; client_no_context_takeover; client_max_window_bits"
/// );
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Deflate {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    client_max_window_bits: Option<u8>,
    level: u32,
    threshold: usize,
}

impl Default for Deflate {
    /// The browser's offer; zlib's default compression level (6); every message compressed.
    fn default() -> Deflate {
        Deflate {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: None,
            client_max_window_bits: None,
            // On 250-byte chat JSON, level 1 leaves each message about 35 bytes longer than 6
            // does, and a client compresses only its own messages: the CPU is not worth saving.
            level: 6,
            threshold: 0,
        }
    }
}

impl Deflate {
    /// Asks the server to compress each message on its own (`server_no_context_takeover`),
    /// so the client's inflate state need not outlive a message.
    pub fn server_no_context_takeover(mut self) -> Deflate {
        self.server_no_context_takeover = true;
        self
    }

    /// Compresses each message on its own and says so (`client_no_context_takeover`): the
    /// client keeps no deflate state between messages, at some cost in ratio.
    pub fn client_no_context_takeover(mut self) -> Deflate {
        self.client_no_context_takeover = true;
        self
    }

    /// Asks the server to compress with a window of at most `2^bits` bytes
    /// (`server_max_window_bits`, 9 to 15; values outside are clamped). The server may answer
    /// with a smaller window, never a larger one.
    pub fn server_max_window_bits(mut self, bits: u8) -> Deflate {
        self.server_max_window_bits = Some(bits.clamp(SMALLEST_CLIENT_WINDOW, 15));
        self
    }

    /// Compresses with a window of at most `2^bits` bytes and says so
    /// (`client_max_window_bits=bits`, 9 to 15; values outside are clamped). Without it the
    /// client offers `client_max_window_bits` without a value, leaving the window to the
    /// server (15 if it names none).
    pub fn client_max_window_bits(mut self, bits: u8) -> Deflate {
        self.client_max_window_bits = Some(bits.clamp(SMALLEST_CLIENT_WINDOW, 15));
        self
    }

    /// The zlib compression level of what the client sends, 0 (stored) to 9 (smallest);
    /// values above 9 are taken as 9. Default 6.
    pub fn level(mut self, level: u32) -> Deflate {
        self.level = level.min(9);
        self
    }

    /// Sends messages shorter than `bytes` uncompressed (RFC 7692 lets each message choose);
    /// a message of a few bytes grows by one or two when compressed. Default 0: every
    /// message is compressed.
    pub fn threshold(mut self, bytes: usize) -> Deflate {
        self.threshold = bytes;
        self
    }

    /// The `Sec-WebSocket-Extensions` value the client sends.
    pub fn offer(&self) -> String {
        let mut offer = PERMESSAGE_DEFLATE.to_owned();
        if self.server_no_context_takeover {
            offer.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            offer.push_str("; client_no_context_takeover");
        }
        if let Some(bits) = self.server_max_window_bits {
            offer.push_str(&format!("; server_max_window_bits={bits}"));
        }
        match self.client_max_window_bits {
            Some(bits) => offer.push_str(&format!("; client_max_window_bits={bits}")),
            None => offer.push_str("; client_max_window_bits"),
        }
        offer
    }

    /// Reads the server's `Sec-WebSocket-Extensions` values (all of them, in order): `None`
    /// when it named no extension (the connection is uncompressed), what was agreed when it
    /// accepted the offer, or why the answer can't be used (RFC 6455 4.1 and RFC 7692 5 and
    /// 7.1: the client must then fail the connection).
    pub fn read_answer<'a>(
        &self,
        values: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Option<Negotiated>, ExtensionError> {
        let mut agreed = None;
        for value in values {
            let value = std::str::from_utf8(value).map_err(|_| ExtensionError::InvalidHeader)?;
            for extension in header::extensions(value) {
                let mut params = header::params(extension);
                let name = params.next().unwrap_or_default().trim();
                if name.is_empty() {
                    continue;
                }
                if !name.eq_ignore_ascii_case(PERMESSAGE_DEFLATE) {
                    return Err(ExtensionError::NotOffered(name.to_owned()));
                }
                if agreed.is_some() {
                    return Err(ExtensionError::Repeated);
                }
                agreed = Some(self.accept(params)?);
            }
        }
        Ok(agreed)
    }

    /// Checks the parameters of the server's one `permessage-deflate` element against the
    /// offer.
    fn accept<'a>(
        &self,
        params: impl Iterator<Item = &'a str>,
    ) -> Result<Negotiated, ExtensionError> {
        let mut answer = Answer::default();
        let mut seen: Vec<String> = Vec::new();
        for (name, value) in params.filter_map(header::name_value) {
            if seen.contains(&name) {
                return Err(ExtensionError::RepeatedParameter(name));
            }
            let invalid = || ExtensionError::InvalidValue {
                name: name.clone(),
                value: value.unwrap_or_default().to_owned(),
            };
            match name.as_str() {
                "server_no_context_takeover" | "client_no_context_takeover" => {
                    if value.is_some() {
                        return Err(invalid());
                    }
                    if name.starts_with("server") {
                        answer.server_no_context_takeover = true;
                    } else {
                        answer.client_no_context_takeover = true;
                    }
                }
                // An answer must give a window a value (RFC 7692 7.1.2.1 and 7.1.2.2).
                "server_max_window_bits" => {
                    answer.server_max_window_bits =
                        Some(value.and_then(header::window_bits).ok_or_else(invalid)?);
                }
                "client_max_window_bits" => {
                    answer.client_max_window_bits =
                        Some(value.and_then(header::window_bits).ok_or_else(invalid)?);
                }
                _ => return Err(ExtensionError::UnknownParameter(name)),
            }
            seen.push(name);
        }
        self.honour(answer)
    }

    /// What the connection runs with, if the client can honour `answer`.
    fn honour(&self, answer: Answer) -> Result<Negotiated, ExtensionError> {
        // A server may name its window unasked; asked, it may only go lower (7.1.2.1). No
        // value is 15.
        let server_max_window_bits = answer.server_max_window_bits.unwrap_or(15);
        if let Some(offered) = self.server_max_window_bits
            && server_max_window_bits > offered
        {
            return Err(ExtensionError::ServerWindowTooLarge {
                offered,
                answered: server_max_window_bits,
            });
        }
        // The client always offers `client_max_window_bits`, so any valid value may come
        // back; the client then compresses with the smaller of its own limit and the server's.
        let client_max_window_bits = match answer.client_max_window_bits {
            Some(bits) if bits < SMALLEST_CLIENT_WINDOW => {
                return Err(ExtensionError::ClientWindowTooSmall(bits));
            }
            Some(bits) => bits.min(self.client_max_window_bits.unwrap_or(15)),
            None => self.client_max_window_bits.unwrap_or(15),
        };
        Ok(Negotiated {
            server_no_context_takeover: answer.server_no_context_takeover,
            // Offered, the client keeps to it even if the server did not repeat it.
            client_no_context_takeover: answer.client_no_context_takeover
                || self.client_no_context_takeover,
            server_max_window_bits,
            client_max_window_bits,
        })
    }

    /// yawc's settings for a client under `config` (the dial's limits and buffers).
    pub(crate) fn options(&self, config: &tungstenite::protocol::WebSocketConfig) -> yawc::Options {
        let compression = yawc::DeflateOptions {
            level: yawc::CompressionLevel::new(self.level),
            compression_threshold: self.threshold,
            ..yawc::DeflateOptions::default()
        };
        yawc::Options {
            compression: Some(compression),
            ..yawc::Options::default()
        }
        .with_limits(
            socket::exclusive_limit(config),
            socket::exclusive_limit(config),
        )
        .with_read_buffer_capacity(config.read_buffer_size)
        .with_write_buffer_capacity(config.write_buffer_size)
        .with_utf8()
    }
}

/// The parameters of a server's answer, as sent.
#[derive(Debug, Default)]
struct Answer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    client_max_window_bits: Option<u8>,
}

/// What a compressed connection runs with: the server's answer to the offer, as the client
/// honours it ([`Connected::compression`](crate::Connected::compression)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Negotiated {
    /// The server compresses each message on its own.
    pub server_no_context_takeover: bool,
    /// The client compresses each message on its own (the server asked, or the client offered).
    pub client_no_context_takeover: bool,
    /// The largest window the server compresses with, in bits (15 when it named none).
    pub server_max_window_bits: u8,
    /// The window the client compresses with, in bits.
    pub client_max_window_bits: u8,
}

impl fmt::Display for Negotiated {
    /// The agreement as a `Sec-WebSocket-Extensions` value, every parameter spelled out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PERMESSAGE_DEFLATE}")?;
        if self.server_no_context_takeover {
            write!(f, "; server_no_context_takeover")?;
        }
        if self.client_no_context_takeover {
            write!(f, "; client_no_context_takeover")?;
        }
        write!(
            f,
            "; server_max_window_bits={}; client_max_window_bits={}",
            self.server_max_window_bits, self.client_max_window_bits
        )
    }
}

/// Why the server's `Sec-WebSocket-Extensions` answer can't be used; the dial fails with
/// [`ConnectError::Extension`](crate::ConnectError::Extension).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExtensionError {
    /// The header is not text.
    #[error("the Sec-WebSocket-Extensions header is not valid text")]
    InvalidHeader,
    /// The server named an extension the client did not offer (RFC 6455 4.1).
    #[error("the server accepted extension {0:?}, which the client did not offer")]
    NotOffered(String),
    /// The server named `permessage-deflate` more than once.
    #[error("the server accepted permessage-deflate more than once")]
    Repeated,
    /// A parameter RFC 7692 does not define.
    #[error("the server answered with unknown parameter {0:?}")]
    UnknownParameter(String),
    /// A parameter named twice.
    #[error("the server answered with parameter {0:?} twice")]
    RepeatedParameter(String),
    /// A parameter with a value it may not have (a window outside 8..=15 or without a value,
    /// a value on a flag).
    #[error("the server answered parameter {name:?} with an invalid value {value:?}")]
    InvalidValue {
        /// The parameter.
        name: String,
        /// Its value as sent (empty: none).
        value: String,
    },
    /// The server compresses with a larger window than the client asked for.
    #[error(
        "the server answered server_max_window_bits={answered}, above the {offered} the client offered"
    )]
    ServerWindowTooLarge {
        /// The client's `server_max_window_bits`.
        offered: u8,
        /// The server's (15 when it named none).
        answered: u8,
    },
    /// The server limits the client to a window it can't compress with.
    #[error(
        "the server answered client_max_window_bits={0}, below the {SMALLEST_CLIENT_WINDOW} bits the client can compress with"
    )]
    ClientWindowTooSmall(u8),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(deflate: &Deflate, values: &[&str]) -> Result<Option<Negotiated>, ExtensionError> {
        deflate.read_answer(values.iter().map(|v| v.as_bytes()))
    }

    const RELAYS: &str =
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    #[test]
    fn offers_read_like_a_browsers() {
        assert_eq!(
            Deflate::default().offer(),
            "permessage-deflate; client_max_window_bits"
        );
        assert_eq!(
            Deflate::default()
                .server_max_window_bits(10)
                .client_max_window_bits(12)
                .offer(),
            "permessage-deflate; server_max_window_bits=10; client_max_window_bits=12"
        );
        // Windows the client can't use are clamped, not offered.
        assert_eq!(
            Deflate::default().client_max_window_bits(8).offer(),
            "permessage-deflate; client_max_window_bits=9"
        );
        assert_eq!(
            Deflate::default().server_max_window_bits(30).offer(),
            "permessage-deflate; server_max_window_bits=15; client_max_window_bits"
        );
    }

    #[test]
    fn no_answer_is_an_uncompressed_connection() {
        assert_eq!(answer(&Deflate::default(), &[]), Ok(None));
        assert_eq!(answer(&Deflate::default(), &[""]), Ok(None));
        assert_eq!(answer(&Deflate::default(), &[" , "]), Ok(None));
    }

    #[test]
    fn the_relays_answer_is_honoured() {
        let agreed = answer(&Deflate::default(), &[RELAYS]).unwrap().unwrap();
        assert_eq!(
            agreed,
            Negotiated {
                server_no_context_takeover: true,
                client_no_context_takeover: true,
                server_max_window_bits: 15,
                client_max_window_bits: 15,
            }
        );
        assert_eq!(
            agreed.to_string(),
            format!("{RELAYS}; server_max_window_bits=15; client_max_window_bits=15")
        );
    }

    #[test]
    fn windows_are_the_smaller_of_offer_and_answer() {
        let deflate = Deflate::default()
            .server_max_window_bits(12)
            .client_max_window_bits(11);
        let agreed = answer(
            &deflate,
            &["permessage-deflate; server_max_window_bits=10; client_max_window_bits=13"],
        )
        .unwrap()
        .unwrap();
        assert_eq!(agreed.server_max_window_bits, 10);
        assert_eq!(agreed.client_max_window_bits, 11);
        // The server may name its window unasked, and quote it.
        let agreed = answer(
            &Deflate::default(),
            &["Permessage-Deflate; Server_Max_Window_Bits=\"9\""],
        )
        .unwrap()
        .unwrap();
        assert_eq!(agreed.server_max_window_bits, 9);
        // 8 bits from the server is fine: a larger inflate window reads it.
        let agreed = answer(
            &Deflate::default(),
            &["permessage-deflate; server_max_window_bits=8"],
        )
        .unwrap()
        .unwrap();
        assert_eq!(agreed.server_max_window_bits, 8);
    }

    #[test]
    fn an_offered_client_no_context_takeover_is_kept() {
        let deflate = Deflate::default().client_no_context_takeover();
        let agreed = answer(&deflate, &["permessage-deflate"]).unwrap().unwrap();
        assert!(agreed.client_no_context_takeover);
        assert!(!agreed.server_no_context_takeover);
    }

    #[test]
    fn answers_the_client_cant_honour_are_refused() {
        let plain = Deflate::default();
        let cases: &[(&Deflate, &str, ExtensionError)] = &[
            (
                &plain,
                "x-webkit-deflate-frame",
                ExtensionError::NotOffered("x-webkit-deflate-frame".into()),
            ),
            (
                &plain,
                "permessage-deflate, permessage-deflate",
                ExtensionError::Repeated,
            ),
            (
                &plain,
                "permessage-deflate; mystery=1",
                ExtensionError::UnknownParameter("mystery".into()),
            ),
            (
                &plain,
                "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
                ExtensionError::RepeatedParameter("server_no_context_takeover".into()),
            ),
            (
                &plain,
                "permessage-deflate; client_max_window_bits",
                ExtensionError::InvalidValue {
                    name: "client_max_window_bits".into(),
                    value: String::new(),
                },
            ),
            (
                &plain,
                "permessage-deflate; server_max_window_bits=16",
                ExtensionError::InvalidValue {
                    name: "server_max_window_bits".into(),
                    value: "16".into(),
                },
            ),
            (
                &plain,
                "permessage-deflate; client_no_context_takeover=yes",
                ExtensionError::InvalidValue {
                    name: "client_no_context_takeover".into(),
                    value: "yes".into(),
                },
            ),
            (
                &plain,
                "permessage-deflate; client_max_window_bits=8",
                ExtensionError::ClientWindowTooSmall(8),
            ),
        ];
        for (deflate, value, expected) in cases {
            assert_eq!(answer(deflate, &[value]).as_ref(), Err(expected), "{value}");
        }
        let limited = Deflate::default().server_max_window_bits(10);
        assert_eq!(
            answer(&limited, &["permessage-deflate; server_max_window_bits=12"]),
            Err(ExtensionError::ServerWindowTooLarge {
                offered: 10,
                answered: 12
            })
        );
        // Naming none is 15, more than asked.
        assert_eq!(
            answer(&limited, &["permessage-deflate"]),
            Err(ExtensionError::ServerWindowTooLarge {
                offered: 10,
                answered: 15
            })
        );
        assert_eq!(
            answer(&plain, &["permessage-deflate", "x-other"]),
            Err(ExtensionError::NotOffered("x-other".into()))
        );
        assert_eq!(
            plain.read_answer([&b"\xff"[..]]),
            Err(ExtensionError::InvalidHeader)
        );
    }

    #[test]
    fn arbitrary_answers_never_panic() {
        for value in [
            "permessage-deflate; \"",
            ";;;,,,",
            "permessage-deflate; server_max_window_bits=\"",
            "permessage-deflate; =",
            "permessage-deflate; client_max_window_bits=\"\"",
        ] {
            let _ = answer(&Deflate::default(), &[value]);
        }
    }
}
