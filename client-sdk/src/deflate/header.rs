//! The grammar of a `Sec-WebSocket-Extensions` value (RFC 6455 9.1) and of the
//! permessage-deflate window sizes (RFC 7692 7.1.2), shared by the offer this client reads
//! back and by the relay, which reads clients' offers.

/// The extensions of one header value, split at the commas outside quotes.
pub fn extensions(value: &str) -> impl Iterator<Item = &str> {
    split_outside_quotes(value, b',')
}

/// The name and then the parameters of one extension, split at the semicolons outside
/// quotes (not trimmed).
pub fn params(extension: &str) -> impl Iterator<Item = &str> {
    split_outside_quotes(extension, b';')
}

/// A parameter value without the quotes RFC 6455 9.1 allows around it.
pub fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(value)
}

/// One parameter of an extension: its name, lowercased, and its value without quotes, if it
/// has one; `None` for an empty parameter (a stray `;`).
pub fn name_value(param: &str) -> Option<(String, Option<&str>)> {
    let param = param.trim();
    if param.is_empty() {
        return None;
    }
    let (name, value) = match param.split_once('=') {
        Some((name, value)) => (name.trim(), Some(unquote(value.trim()))),
        None => (param, None),
    };
    Some((name.to_ascii_lowercase(), value))
}

/// A window size as RFC 7692 7.1.2 writes it: 1*DIGIT, 8 to 15, no leading zero.
pub fn window_bits(value: &str) -> Option<u8> {
    if value.is_empty() || value.len() > 2 || value.starts_with('0') {
        return None;
    }
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

fn split_outside_quotes(text: &str, separator: u8) -> impl Iterator<Item = &str> {
    let mut start = 0;
    let mut quoted = false;
    let mut pieces = Vec::new();
    for (index, byte) in text.bytes().enumerate() {
        match byte {
            b'"' => quoted = !quoted,
            _ if byte == separator && !quoted => {
                pieces.push(&text[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    pieces.push(&text[start..]);
    pieces.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_and_semicolons_inside_quotes_do_not_split() {
        let list: Vec<_> = extensions(r#"a; p="x,y", b"#).collect();
        assert_eq!(list, vec![r#"a; p="x,y""#, " b"]);
        let parts: Vec<_> = params(r#"a; p="1;2"; q"#).collect();
        assert_eq!(parts, vec!["a", r#" p="1;2""#, " q"]);
        assert_eq!(unquote(r#""10""#), "10");
        assert_eq!(
            name_value(r#" Client_Max_Window_Bits = "10" "#),
            Some(("client_max_window_bits".to_owned(), Some("10")))
        );
        assert_eq!(name_value("  "), None);
    }

    #[test]
    fn window_bits_are_8_to_15_without_leading_zeros() {
        assert_eq!(window_bits("8"), Some(8));
        assert_eq!(window_bits("15"), Some(15));
        for bad in ["", "7", "16", "08", "1a", "+9", "150"] {
            assert_eq!(window_bits(bad), None, "{bad:?}");
        }
    }
}
