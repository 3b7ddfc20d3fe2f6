//! [`Rewind`]: the socket under a compressed dial. tungstenite runs the handshake and may read
//! past the `101` response (a server can send its first frames right behind it); those bytes
//! end up in tungstenite's buffer, which yawc can't be given. So while the handshake runs, the
//! socket keeps a copy of what it reads; afterwards what followed the response head is read
//! again first.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A socket that records what it reads until [`Rewind::finish_handshake`], then replays the
/// bytes after the response head before reading on.
#[derive(Debug)]
pub(crate) struct Rewind<S> {
    inner: S,
    /// Everything read so far, while the handshake runs.
    recorded: Option<Vec<u8>>,
    /// Bytes to hand out before reading `inner` again.
    replay: Vec<u8>,
    /// How much of `replay` was handed out.
    replayed: usize,
}

impl<S> Rewind<S> {
    /// Wraps `inner` for a handshake: reads are recorded.
    pub fn new(inner: S) -> Rewind<S> {
        Rewind {
            inner,
            recorded: Some(Vec::new()),
            replay: Vec::new(),
            replayed: 0,
        }
    }

    /// Ends recording, once the handshake's response has been read: what came after the
    /// response head is read again first. Returns those bytes too.
    pub fn finish_handshake(&mut self) -> &[u8] {
        let recorded = self.recorded.take().unwrap_or_default();
        let end = head_end(&recorded).unwrap_or(recorded.len());
        self.replay = recorded[end..].to_vec();
        self.replayed = 0;
        &self.replay
    }

    /// The socket, with nothing left to replay (for an uncompressed connection, where
    /// tungstenite is given the bytes after the head itself).
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Where an HTTP head ends: after the first empty line, as httparse reads it (a line may end
/// in CRLF or a bare LF).
fn head_end(bytes: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    for (index, byte) in bytes.iter().enumerate() {
        if *byte == b'\n' {
            let line = &bytes[line_start..index];
            if line.is_empty() || line == b"\r" {
                return Some(index + 1);
            }
            line_start = index + 1;
        }
    }
    None
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.replayed < this.replay.len() {
            let rest = &this.replay[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            if this.replayed == this.replay.len() {
                this.replay = Vec::new();
                this.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Some(recorded) = &mut this.recorded {
            recorded.extend_from_slice(&buf.filled()[before..]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn heads_end_at_the_first_empty_line() {
        assert_eq!(head_end(b"HTTP/1.1 101 x\r\nA: b\r\n\r\nrest"), Some(24));
        assert_eq!(head_end(b"HTTP/1.1 101 x\nA: b\n\nrest"), Some(21));
        assert_eq!(head_end(b"HTTP/1.1 101 x\r\nA: b\r\n"), None);
    }

    #[tokio::test]
    async fn bytes_behind_the_head_are_read_again() {
        let (client, mut server) = tokio::io::duplex(1024);
        let mut rewind = Rewind::new(client);
        server
            .write_all(b"HTTP/1.1 101 Switching\r\n\r\n\x81\x02hi")
            .await
            .unwrap();
        let mut head = [0u8; 64];
        let n = rewind.read(&mut head).await.unwrap();
        assert_eq!(n, 30);
        assert_eq!(rewind.finish_handshake(), b"\x81\x02hi");
        server.write_all(b"more").await.unwrap();
        drop(server);
        let mut after = Vec::new();
        rewind.read_to_end(&mut after).await.unwrap();
        assert_eq!(after, b"\x81\x02himore");
    }
}
