//! The read buffer a worker thread's WebSockets share. A read lands here, the connection takes
//! the frames it can use and copies only what is left (part of a frame, frames behind the
//! message it delivers) into a buffer of its own; so a connection waiting for its peer holds
//! none, and reads are still large.

use std::cell::RefCell;

/// Size of one read from a socket: several 4 KiB messages at a time, and the most a socket
/// hands over in one go on loopback.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    static BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// Runs `read` with this thread's buffer. `read` must not call `with` again: a WebSocket reads
/// one socket at a time.
pub(super) fn with<R>(read: impl FnOnce(&mut [u8]) -> R) -> R {
    BUFFER.with(|buffer| read(&mut buffer.borrow_mut()))
}
