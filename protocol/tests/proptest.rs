//! Property tests: valid frames round-trip, and arbitrary or mutated input never panics and
//! never yields a frame outside the limits.

use bytes::Bytes;
use proptest::prelude::*;
use wsrelay_protocol::{Frame, Hello, Limits, decode_all, encode, encode_into};

const SMALL: Limits = Limits {
    max_frame: 48,
    max_string: 12,
    max_headers: 3,
};

fn stream() -> impl Strategy<Value = u64> {
    prop_oneof![1u64..300, 1u64..=u64::MAX]
}

fn text() -> impl Strategy<Value = String> {
    ".{0,16}"
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u16>(), any::<u32>(), any::<u32>()).prop_map(
            |(version, max_frame, initial_window)| {
                Frame::Hello(Hello {
                    version,
                    max_frame,
                    initial_window,
                })
            }
        ),
        (
            stream(),
            text(),
            text(),
            prop::collection::vec((text(), prop::collection::vec(any::<u8>(), 0..16)), 0..5),
            text(),
            any::<bool>()
        )
            .prop_map(
                |(stream, path, query, headers, client_addr, resumed)| Frame::Open {
                    stream,
                    path,
                    query,
                    headers,
                    client_addr,
                    resumed,
                }
            ),
        (stream(), prop::option::of(text()))
            .prop_map(|(stream, protocol)| Frame::Accept { stream, protocol }),
        (stream(), any::<u16>(), text()).prop_map(|(stream, status, reason)| Frame::Reject {
            stream,
            status,
            reason
        }),
        (
            stream(),
            any::<bool>(),
            prop::collection::vec(any::<u8>(), 0..80)
        )
            .prop_map(|(stream, text, payload)| Frame::Data {
                stream,
                text,
                payload: Bytes::from(payload),
            }),
        (stream(), 1u32..=u32::MAX).prop_map(|(stream, credit)| Frame::Window { stream, credit }),
        (stream(), any::<u16>(), text()).prop_map(|(stream, code, reason)| Frame::Close {
            stream,
            code,
            reason
        }),
        text().prop_map(|reason| Frame::GoAway { reason }),
    ]
}

/// Asserts that a decoded frame respects `limits` and is a zero-copy view of `message`.
fn assert_within(frame: &Frame, message: &Bytes, limits: &Limits) {
    let strings: Vec<usize> = match frame {
        Frame::Hello(_) | Frame::Window { .. } => vec![],
        Frame::Open {
            path,
            query,
            headers,
            client_addr,
            ..
        } => {
            assert!(headers.len() <= limits.max_headers);
            let mut v = vec![path.len(), query.len(), client_addr.len()];
            for (name, value) in headers {
                v.push(name.len());
                v.push(value.len());
            }
            v
        }
        Frame::Accept { protocol, .. } => protocol.iter().map(String::len).collect(),
        Frame::Reject { reason, .. } | Frame::Close { reason, .. } | Frame::GoAway { reason } => {
            vec![reason.len()]
        }
        Frame::Data { payload, .. } => {
            assert!(payload.len() <= limits.max_frame);
            if !payload.is_empty() {
                assert!(message.as_ptr_range().contains(&payload.as_ptr()));
            }
            vec![]
        }
    };
    assert!(strings.iter().all(|&n| n <= limits.max_string), "{frame:?}");
    if let Some(stream) = frame.stream() {
        assert_ne!(stream, 0);
    }
    if let Frame::Window { credit, .. } = frame {
        assert_ne!(*credit, 0);
    }
}

/// Decodes `message` fully; checks every frame and that decoded frames re-encode to an
/// equivalent encoding.
fn check_decode(message: Vec<u8>, limits: &Limits) {
    let message = Bytes::from(message);
    for item in decode_all(message.clone(), limits) {
        match item {
            Ok(frame) => {
                assert_within(&frame, &message, limits);
                let again = encode(&frame);
                let back: Vec<Frame> = decode_all(again, limits)
                    .collect::<Result<_, _>>()
                    .expect("a decoded frame re-encodes to valid bytes");
                assert_eq!(back, vec![frame]);
            }
            Err(e) => assert!(e.offset() <= message.len(), "{e}"),
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (
            any::<usize>(),
            prop::sample::select(vec![0x00, 0x01, 0xfb, 0xfc, 0xfd, 0xfe, 0xff])
        )
            .prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match *m {
        Mutation::Set(i, b) if len > 0 => bytes[i % len] = b,
        Mutation::Insert(i, b) => bytes.insert(i % (len + 1), b),
        Mutation::Remove(i) if len > 0 => {
            bytes.remove(i % len);
        }
        Mutation::Truncate(i) => bytes.truncate(i % (len + 1)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn batches_round_trip(frames in prop::collection::vec(arb_frame(), 1..8)) {
        let mut message = Vec::new();
        for f in &frames {
            encode_into(f, &mut message);
        }
        let message = Bytes::from(message);
        let decoded: Vec<Frame> = decode_all(message.clone(), &Limits::default())
            .collect::<Result<_, _>>()
            .unwrap();
        for f in &decoded {
            assert_within(f, &message, &Limits::default());
        }
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_decode(bytes.clone(), &SMALL);
        check_decode(bytes, &Limits::default());
    }

    #[test]
    fn random_bytes_after_a_valid_tag_never_panic(
        tag in 1u8..=8,
        bytes in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut message = vec![tag];
        message.extend(bytes);
        check_decode(message.clone(), &SMALL);
        check_decode(message, &Limits::default());
    }

    #[test]
    fn mutated_encodings_never_panic(
        frames in prop::collection::vec(arb_frame(), 1..5),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let mut message = Vec::new();
        for f in &frames {
            encode_into(f, &mut message);
        }
        for m in &mutations {
            apply(&mut message, m);
        }
        check_decode(message.clone(), &SMALL);
        check_decode(message, &Limits::default());
    }
}
