//! Counting what a connection carried on the wire, e.g. to compare compressed and plain bytes,
//! and the chat traffic such comparisons send.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read and written through one or more [`CountedStream`]s; clones share the counts.
#[derive(Clone, Debug, Default)]
pub struct WireCount {
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl WireCount {
    /// Bytes read so far.
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Bytes both ways so far.
    pub fn total(&self) -> u64 {
        self.read() + self.written()
    }
}

/// A stream that adds every byte read from or written to `inner` to a [`WireCount`].
pub struct CountedStream<S> {
    inner: S,
    count: WireCount,
}

impl<S> CountedStream<S> {
    /// Wraps `inner`, counting into `count`.
    pub fn new(inner: S, count: WireCount) -> CountedStream<S> {
        CountedStream { inner, count }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CountedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        self.count.read.fetch_add(read, Ordering::Relaxed);
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.count.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Chat message `i` of a realtime app, as JSON (about 250 bytes): what compression figures
/// are measured on.
pub fn chat_message(i: usize) -> String {
    format!(
        r#"{{"type":"message","room":"general","id":{id},"user":{{"id":"u-{user}","name":"User {user}","avatar":"https://cdn.example.com/avatars/u-{user}.png"}},"text":"Hello everyone, this is message number {i} in the general room","ts":"2026-12-01T15:{min:02}:{sec:02}Z","reactions":[]}}"#,
        id = 100_000 + i,
        user = i % 7,
        min = i % 60,
        sec = (i * 7) % 60,
    )
}
