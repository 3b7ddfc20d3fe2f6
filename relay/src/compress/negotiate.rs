//! The server side of the `permessage-deflate` negotiation (RFC 7692 section 5 and 7.1), as
//! pure functions over the client's `Sec-WebSocket-Extensions` headers: parse the offers,
//! take the first one the relay can honour, and say what to answer.
//!
//! The relay's answer always carries `server_no_context_takeover` and
//! `client_no_context_takeover` (RFC 7692 7.1.1.1 and 7.1.1.2 let a server add both to any
//! offer it accepts): no message then refers to an earlier one, so a connection needs deflate
//! state only while a message is being compressed or decompressed, and an idle client holds
//! none (the state is pooled, see `super::DeflateSettings`).

use std::fmt;

use wsrelay_client::deflate::header;

/// The extension's registered name.
pub const PERMESSAGE_DEFLATE: &str = "permessage-deflate";

/// The smallest window the relay's deflate can compress with: zlib (and zlib-rs) refuse a
/// raw deflate stream with 8 bits, and one made with 9 may refer further back than a client
/// that asked for 8 keeps. An offer that limits the relay to 8 bits is declined.
const SMALLEST_SERVER_WINDOW: u8 = 9;

/// Why one offer was declined (RFC 7692 section 5: a server must decline an offer with an
/// unknown, repeated or invalid parameter).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Declined {
    /// A parameter RFC 7692 does not define for an offer.
    #[error("unknown parameter {0:?}")]
    UnknownParameter(String),
    /// A parameter named twice in one offer.
    #[error("parameter {0:?} given twice")]
    RepeatedParameter(String),
    /// A parameter with a value it may not have (a window outside 8..=15, a value on a
    /// flag, no value on `server_max_window_bits`).
    #[error("parameter {name:?} has an invalid value {value:?}")]
    InvalidValue {
        /// The parameter.
        name: String,
        /// Its value as sent (empty: none).
        value: String,
    },
    /// A valid offer the relay can't honour: `server_max_window_bits=8`.
    #[error(
        "server_max_window_bits={0} is below the {SMALLEST_SERVER_WINDOW} bits the relay can compress with"
    )]
    WindowTooSmall(u8),
}

/// One `permessage-deflate` offer, its parameters parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offer {
    /// The client asks the relay not to keep its compression context between messages.
    pub server_no_context_takeover: bool,
    /// The client says it will not keep its own context.
    pub client_no_context_takeover: bool,
    /// The largest window the relay may compress with, when the client limits it.
    pub server_max_window_bits: Option<u8>,
    /// The client accepts a limit on its own window: `Some(None)` without a value,
    /// `Some(Some(bits))` with the largest it would use anyway.
    pub client_max_window_bits: Option<Option<u8>>,
}

/// What the relay agreed to: the parameters of the answer, which are also how each side
/// compresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The window the relay compresses with (15 unless the client limited it).
    pub server_max_window_bits: u8,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` value that accepts the offer. Both no-context-takeover
    /// parameters are always there; `server_max_window_bits` only when the client limited the
    /// window below 15, the default.
    pub fn header_value(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Agreed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PERMESSAGE_DEFLATE}; server_no_context_takeover; client_no_context_takeover"
        )?;
        if self.server_max_window_bits < 15 {
            write!(
                f,
                "; server_max_window_bits={}",
                self.server_max_window_bits
            )?;
        }
        Ok(())
    }
}

/// Chooses the answer to a client's `Sec-WebSocket-Extensions` header values (all of them, in
/// order): the first `permessage-deflate` offer the relay can honour, or `None` when there is
/// none (then the answer names no extension and the leg is uncompressed). Other extensions
/// are declined by leaving them out.
pub fn choose<'a>(headers: impl IntoIterator<Item = &'a [u8]>) -> Option<Agreed> {
    headers
        .into_iter()
        .filter_map(|value| std::str::from_utf8(value).ok())
        .flat_map(header::extensions)
        .filter_map(|extension| {
            let mut parts = header::params(extension);
            let name = parts.next()?.trim();
            name.eq_ignore_ascii_case(PERMESSAGE_DEFLATE)
                .then(|| parse_offer(parts))
        })
        .find_map(|offer| offer.and_then(|offer| accept(&offer)).ok())
}

/// What the relay answers one valid offer with, or why it declines it.
pub fn accept(offer: &Offer) -> Result<Agreed, Declined> {
    let server_max_window_bits = match offer.server_max_window_bits {
        Some(bits) if bits < SMALLEST_SERVER_WINDOW => return Err(Declined::WindowTooSmall(bits)),
        Some(bits) => bits,
        None => 15,
    };
    // `client_max_window_bits` needs no answer: the relay inflates with a 15-bit window, which
    // reads whatever window the client compresses with.
    Ok(Agreed {
        server_max_window_bits,
    })
}

/// Parses the parameters of one offer (what follows the name, split at `;`).
pub fn parse_offer<'a>(params: impl Iterator<Item = &'a str>) -> Result<Offer, Declined> {
    let mut offer = Offer::default();
    let mut seen: Vec<String> = Vec::new();
    for (name, value) in params.filter_map(header::name_value) {
        if seen.contains(&name) {
            return Err(Declined::RepeatedParameter(name));
        }
        let invalid = |name: &str| Declined::InvalidValue {
            name: name.to_owned(),
            value: value.unwrap_or_default().to_owned(),
        };
        match name.as_str() {
            "server_no_context_takeover" | "client_no_context_takeover" => {
                if value.is_some() {
                    return Err(invalid(&name));
                }
                if name.starts_with("server") {
                    offer.server_no_context_takeover = true;
                } else {
                    offer.client_no_context_takeover = true;
                }
            }
            "server_max_window_bits" => {
                let bits = value
                    .and_then(header::window_bits)
                    .ok_or_else(|| invalid(&name))?;
                offer.server_max_window_bits = Some(bits);
            }
            "client_max_window_bits" => {
                let bits = match value {
                    None => None,
                    Some(value) => Some(header::window_bits(value).ok_or_else(|| invalid(&name))?),
                };
                offer.client_max_window_bits = Some(bits);
            }
            _ => return Err(Declined::UnknownParameter(name)),
        }
        seen.push(name);
    }
    Ok(offer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(headers: &[&str]) -> Option<String> {
        choose(headers.iter().map(|h| h.as_bytes())).map(|agreed| agreed.header_value())
    }

    const BOTH: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    #[test]
    fn a_browsers_offer_gets_both_no_context_takeovers() {
        // Chromium and Firefox send this.
        assert_eq!(
            answer(&["permessage-deflate; client_max_window_bits"]).as_deref(),
            Some(BOTH)
        );
        assert_eq!(answer(&["permessage-deflate"]).as_deref(), Some(BOTH));
    }

    #[test]
    fn no_offer_or_another_extension_gets_nothing() {
        assert_eq!(answer(&[]), None);
        assert_eq!(answer(&["x-webkit-deflate-frame"]), None);
        assert_eq!(answer(&[""]), None);
    }

    #[test]
    fn the_servers_window_limit_is_honoured_and_named() {
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=10"]).as_deref(),
            Some(&*format!("{BOTH}; server_max_window_bits=10"))
        );
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=\"12\""]).as_deref(),
            Some(&*format!("{BOTH}; server_max_window_bits=12"))
        );
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=15"]).as_deref(),
            Some(BOTH)
        );
    }

    #[test]
    fn a_window_of_8_is_declined_and_the_next_offer_taken() {
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=8"]),
            None
        );
        assert_eq!(
            answer(&[
                "permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=9"
            ])
            .as_deref(),
            Some(&*format!("{BOTH}; server_max_window_bits=9"))
        );
    }

    #[test]
    fn invalid_offers_are_declined_and_the_next_taken() {
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=09",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=x",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; mystery",
        ] {
            assert_eq!(answer(&[bad]), None, "{bad}");
            assert_eq!(
                answer(&[bad, "permessage-deflate"]).as_deref(),
                Some(BOTH),
                "{bad}, then a plain offer"
            );
        }
    }

    #[test]
    fn offers_span_headers_and_lists_in_order() {
        // Autobahn's case 13.7 offers three, best first.
        let offers = "permessage-deflate; server_no_context_takeover; server_max_window_bits=9; client_max_window_bits, \
                      permessage-deflate; server_no_context_takeover; client_max_window_bits, \
                      permessage-deflate; client_max_window_bits";
        assert_eq!(
            answer(&[offers]).as_deref(),
            Some(&*format!("{BOTH}; server_max_window_bits=9"))
        );
        assert_eq!(
            answer(&[
                "foo, bar; baz=\"a,b\"",
                "PerMessage-Deflate ;Client_Max_Window_Bits"
            ])
            .as_deref(),
            Some(BOTH)
        );
    }

    #[test]
    fn parses_every_parameter() {
        let offer = parse_offer(header::params(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10; client_max_window_bits=12",
        ).skip(1))
        .unwrap();
        assert_eq!(
            offer,
            Offer {
                server_no_context_takeover: true,
                client_no_context_takeover: true,
                server_max_window_bits: Some(10),
                client_max_window_bits: Some(Some(12)),
            }
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        for header in [
            &b"\xff\xfe"[..],
            b"permessage-deflate; \"",
            b";;;,,,",
            b"permessage-deflate; server_max_window_bits=\"",
            b"permessage-deflate; =",
        ] {
            let _ = choose([header]);
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Pieces offers are made of, so mutated offers come close to valid ones.
    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("permessage-deflate".to_owned()),
            Just("; ".to_owned()),
            Just(", ".to_owned()),
            Just("server_no_context_takeover".to_owned()),
            Just("client_no_context_takeover".to_owned()),
            Just("server_max_window_bits".to_owned()),
            Just("client_max_window_bits".to_owned()),
            Just("=".to_owned()),
            Just("\"".to_owned()),
            (0u8..20).prop_map(|n| n.to_string()),
            "[ -~]{0,6}",
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_offers_get_a_valid_answer_or_none(
            headers in proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(piece(), 0..12).prop_map(|p| p.concat().into_bytes()),
                    proptest::collection::vec(any::<u8>(), 0..40),
                ],
                0..3,
            ),
        ) {
            if let Some(agreed) = choose(headers.iter().map(Vec::as_slice)) {
                // The answer is a header value, and names a window the relay can use.
                prop_assert!(http::HeaderValue::from_str(&agreed.header_value()).is_ok());
                prop_assert!((SMALLEST_SERVER_WINDOW..=15).contains(&agreed.server_max_window_bits));
                // And it is what the relay would accept as an offer itself.
                let answer = agreed.header_value();
                let again = choose([answer.as_bytes()]);
                prop_assert_eq!(again, Some(agreed));
            }
        }
    }
}
