//! Addresses and numbers written as ASCII text straight into a byte buffer. Every client's
//! connect writes a few (its hash key, `X-Forwarded-For`, `X-Real-IP`, its connection id), and
//! the formatting machinery (`Display` through `fmt::Write`) cost about 1,300 instructions
//! for each IPv4 address, a percent of a whole connect.

use std::io::Write as _;
use std::net::IpAddr;

/// Appends `ip` as text: dotted decimal for IPv4, RFC 5952's form for IPv6 (as `Display`
/// writes both).
pub(crate) fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (index, octet) in v4.octets().into_iter().enumerate() {
                if index > 0 {
                    out.push(b'.');
                }
                push_decimal(out, u64::from(octet));
            }
        }
        // Rare on the connect path, and its compression rules are `Display`'s to get right.
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// Appends `number` in decimal.
pub(crate) fn push_decimal(out: &mut Vec<u8>, mut number: u64) {
    // u64::MAX has 20 digits.
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (number % 10) as u8;
        number /= 10;
        if number == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    fn ip_text(ip: IpAddr) -> String {
        let mut out = Vec::new();
        push_ip(&mut out, ip);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn addresses_read_as_display_writes_them() {
        for ip in [
            IpAddr::V4(Ipv4Addr::new(0, 0, 0, 0)),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
            IpAddr::V4(Ipv4Addr::new(255, 255, 255, 255)),
            IpAddr::V4(Ipv4Addr::new(10, 200, 3, 45)),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6("2001:db8::ff00:42:8329".parse().unwrap()),
            IpAddr::V6("::ffff:192.0.2.1".parse().unwrap()),
        ] {
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    #[test]
    fn numbers_at_their_edges() {
        for number in [0, 9, 10, 99, 100, 1_000_000, u64::MAX] {
            let mut out = b"id=".to_vec();
            push_decimal(&mut out, number);
            assert_eq!(out, format!("id={number}").into_bytes());
        }
    }

    proptest! {
        #[test]
        fn any_address_or_number_reads_as_display_writes_it(
            v4 in any::<u32>(), v6 in any::<u128>(), number in any::<u64>()
        ) {
            let v4 = IpAddr::V4(Ipv4Addr::from(v4));
            prop_assert_eq!(ip_text(v4), v4.to_string());
            let v6 = IpAddr::V6(Ipv6Addr::from(v6));
            prop_assert_eq!(ip_text(v6), v6.to_string());
            let mut out = Vec::new();
            push_decimal(&mut out, number);
            prop_assert_eq!(out, number.to_string().into_bytes());
        }
    }
}
