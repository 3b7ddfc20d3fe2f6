//! The worked examples in README.md, checked byte for byte.

use bytes::Bytes;
use wsrelay_protocol::{DecodeError, Frame, Limits, decode_all, encode, encode_into};

const README: &str = include_str!("../README.md");

/// The bytes of the hex block after `<!-- wire-example: NAME -->` in the README: on each line,
/// the hex pairs left of `|`.
fn readme_example(name: &str) -> Vec<u8> {
    let marker = format!("<!-- wire-example: {name} -->");
    let start = README
        .find(&marker)
        .unwrap_or_else(|| panic!("README has no {marker}"));
    let mut lines = README[start + marker.len()..]
        .lines()
        .skip_while(|l| l.trim().is_empty());
    assert_eq!(
        lines.next(),
        Some("```text"),
        "{name}: expected a text block"
    );
    let mut bytes = Vec::new();
    for line in lines.take_while(|l| *l != "```") {
        let hex = line.split('|').next().unwrap();
        for pair in hex.split_whitespace() {
            bytes.push(u8::from_str_radix(pair, 16).unwrap_or_else(|_| panic!("{name}: {pair}")));
        }
    }
    bytes
}

fn data_example() -> Frame {
    Frame::Data {
        stream: 300,
        text: true,
        payload: Bytes::from_static(b"hello"),
    }
}

fn open_example() -> Frame {
    Frame::Open {
        stream: 7,
        path: "/chat".into(),
        query: "room=1".into(),
        headers: vec![("origin".into(), b"https://a.example".to_vec())],
        client_addr: "203.0.113.7:51234".into(),
        resumed: false,
    }
}

#[test]
fn data_example_matches_readme() {
    let bytes = readme_example("data");
    assert_eq!(
        bytes,
        [
            0x05, 0xfb, 0x2c, 0x01, 0x01, 0x05, 0x68, 0x65, 0x6c, 0x6c, 0x6f
        ]
    );
    assert_eq!(encode(&data_example()).to_vec(), bytes);
}

#[test]
fn open_example_matches_readme() {
    let bytes = readme_example("open");
    assert_eq!(bytes.len(), 60);
    assert_eq!(encode(&open_example()).to_vec(), bytes);
}

#[test]
fn both_examples_in_one_message_decode() {
    let mut message = readme_example("data");
    message.extend(readme_example("open"));
    let mut check = Vec::new();
    encode_into(&data_example(), &mut check);
    encode_into(&open_example(), &mut check);
    assert_eq!(check, message);
    let frames: Vec<Frame> = decode_all(Bytes::from(message), &Limits::default())
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(frames, vec![data_example(), open_example()]);
}

#[test]
fn readme_varint_examples_hold() {
    let cases: [(u64, &str); 7] = [
        (0, "00"),
        (250, "fa"),
        (251, "fb fb 00"),
        (300, "fb 2c 01"),
        (65536, "fc 00 00 01 00"),
        (1 << 60, "fd 00 00 00 00 00 00 00 10"),
        (5, "05"),
    ];
    for (value, hex) in cases {
        let got = bincode::encode_to_vec(value, bincode::config::standard()).unwrap();
        let got: Vec<String> = got.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got.join(" "), hex);
        assert!(README.contains(&format!("`{hex}`")), "README lacks `{hex}`");
    }
    // A longer-than-needed form is accepted, as the README says.
    let (v, _): (u64, usize) =
        bincode::decode_from_slice(&[0xfb, 0x05, 0x00], bincode::config::standard()).unwrap();
    assert_eq!(v, 5);
}

#[test]
fn readme_error_texts_hold() {
    let mut huge = vec![0x05, 0x01, 0x00, 0xfd];
    huge.extend((1u64 << 60).to_le_bytes());
    let err = decode_all(Bytes::from(huge), &Limits::default())
        .next()
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, DecodeError::TooLong { .. }));
    assert!(README.contains(&format!("`{err}`")), "README lacks `{err}`");
    let err = decode_all(Bytes::from_static(&[0x08, 0x00, 0x42]), &Limits::default())
        .nth(1)
        .unwrap()
        .unwrap_err();
    assert!(README.contains(&format!("`{err}`")), "README lacks `{err}`");
}
