//! Huge declared lengths are refused without allocating: a counting global allocator records
//! the largest allocation made on the test thread while decoding.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::Bytes;
use wsrelay_protocol::{DecodeError, Frame, Limits, decode_all, encode};

struct Counting;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

// SAFETY: defers to the system allocator; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Decodes `message` and returns the first error, if any, and the largest allocation made
/// meanwhile.
fn decode_tracked(message: Vec<u8>, limits: &Limits) -> (Option<DecodeError>, usize) {
    let message = Bytes::from(message);
    LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    let result = decode_all(message, limits).find_map(Result::err);
    TRACKING.with(|t| t.set(false));
    (result, LARGEST.with(Cell::get))
}

#[test]
fn the_counter_sees_decoder_allocations() {
    let open = Frame::Open {
        stream: 1,
        path: "/".repeat(5000),
        query: String::new(),
        headers: vec![],
        client_addr: String::new(),
        resumed: false,
    };
    let (err, largest) = decode_tracked(encode(&open).to_vec(), &Limits::default());
    assert_eq!(err, None);
    assert!(largest >= 5000, "largest allocation seen: {largest}");
}

fn with_huge_len(prefix: &[u8]) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.push(0xfd);
    v.extend((1u64 << 60).to_le_bytes());
    v.extend([0u8; 16]);
    v
}

#[test]
fn huge_declared_lengths_do_not_allocate() {
    let unlimited = Limits {
        max_frame: usize::MAX,
        max_string: usize::MAX,
        max_headers: usize::MAX,
    };
    let cases: [(&str, Vec<u8>); 5] = [
        ("Data.payload", with_huge_len(&[0x05, 0x01, 0x00])),
        ("Open.path", with_huge_len(&[0x02, 0x01])),
        ("Open.headers", with_huge_len(&[0x02, 0x01, 0x00, 0x00])),
        (
            "Open header value",
            with_huge_len(&[0x02, 0x01, 0x00, 0x00, 0x01, 0x00]),
        ),
        ("GoAway.reason", with_huge_len(&[0x08])),
    ];
    for limits in [Limits::default(), unlimited] {
        for (what, message) in &cases {
            let (err, largest) = decode_tracked(message.clone(), &limits);
            let err = err.expect("decoding should fail");
            assert!(
                matches!(
                    err,
                    DecodeError::TooLong { .. }
                        | DecodeError::TooManyHeaders { .. }
                        | DecodeError::Truncated { .. }
                ),
                "{what}: {err}"
            );
            assert!(largest < 1024, "{what}: allocated {largest} bytes");
        }
    }
}
