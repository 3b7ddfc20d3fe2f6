//! Fuzzes the frame decoder: arbitrary bytes must never panic, every decoded frame must respect
//! the limits, and a decoded frame must re-encode to bytes that decode to the same frame.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use wsrelay_protocol::{Frame, Limits, decode_all, encode};

const LIMITS: Limits = Limits {
    max_frame: 256,
    max_string: 64,
    max_headers: 8,
};

fn check(frame: &Frame, message: &Bytes) {
    let mut strings: Vec<usize> = Vec::new();
    match frame {
        Frame::Hello(_) => {}
        Frame::Window { credit, .. } => assert_ne!(*credit, 0),
        Frame::Open {
            path,
            query,
            headers,
            client_addr,
            ..
        } => {
            assert!(headers.len() <= LIMITS.max_headers);
            strings.extend([path.len(), query.len(), client_addr.len()]);
            for (name, value) in headers {
                strings.extend([name.len(), value.len()]);
            }
        }
        Frame::Accept { protocol, .. } => strings.extend(protocol.iter().map(String::len)),
        Frame::Reject { reason, .. } | Frame::Close { reason, .. } | Frame::GoAway { reason } => {
            strings.push(reason.len())
        }
        Frame::Data { payload, .. } => {
            assert!(payload.len() <= LIMITS.max_frame);
            if !payload.is_empty() {
                assert!(message.as_ptr_range().contains(&payload.as_ptr()));
            }
        }
    }
    assert!(strings.iter().all(|&n| n <= LIMITS.max_string));
    assert_ne!(frame.stream(), Some(0));
}

fuzz_target!(|data: &[u8]| {
    let message = Bytes::copy_from_slice(data);
    for item in decode_all(message.clone(), &LIMITS) {
        match item {
            Ok(frame) => {
                check(&frame, &message);
                let again = encode(&frame);
                assert_eq!(again.len(), frame.encoded_len());
                let mut back = decode_all(again, &LIMITS);
                assert_eq!(back.next(), Some(Ok(frame)));
                assert_eq!(back.next(), None);
            }
            Err(e) => assert!(e.offset() <= message.len()),
        }
    }
});
