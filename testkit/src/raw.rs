//! Raw TCP: bytes in, bytes out, HTTP requests and WebSocket frames written by hand.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wait::WAIT;

/// An address nothing listens on right now (a port bound, then released). It is on
/// 127.0.0.3, where nothing else binds: on 127.0.0.1 the port could be taken meanwhile as the
/// source port of one of the many connections parallel tests open, before a relay process the
/// test starts gets to listen on it.
pub fn unused_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.3:0").unwrap();
    listener.local_addr().unwrap()
}

/// Sends raw bytes over TCP and returns everything read until the peer closes or `quiet`
/// passes without data.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], quiet: Duration) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    read_until_quiet(&mut tcp, quiet).await
}

/// Reads until EOF, an error, or `quiet` without data.
pub async fn read_until_quiet(tcp: &mut TcpStream, quiet: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout(quiet, tcp.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buffer[..n]),
        }
    }
}

/// The status code of a raw HTTP response.
pub fn status_of(response: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(response);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"))
}

/// A valid upgrade request for `path` (key `dGhlIHNhbXBsZSBub25jZQ==`), with extra header
/// lines, each ending in `\r\n`.
pub fn upgrade_request(path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: relay.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
    .into_bytes()
}

/// A raw client: completes the handshake over plain TCP and then lets a test write frames
/// byte by byte (unmasked, reserved opcodes, bad UTF-8 ...) or go silent.
pub struct RawClient {
    /// The socket, after the `101` response.
    pub tcp: TcpStream,
}

impl RawClient {
    /// Connects and completes the handshake.
    pub async fn connect(addr: SocketAddr, path: &str) -> RawClient {
        RawClient::handshake(TcpStream::connect(addr).await.unwrap(), path).await
    }

    /// Connects with a fixed kernel receive buffer of `bytes` (which turns off the kernel's
    /// autotuning), so a client that never reads holds a few KiB in its kernel rather than
    /// megabytes: tests of what the relay buffers then measure the relay.
    pub async fn connect_with_receive_buffer(
        addr: SocketAddr,
        path: &str,
        bytes: u32,
    ) -> RawClient {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .unwrap();
        socket.set_recv_buffer_size(bytes).unwrap();
        RawClient::handshake(socket.connect(addr).await.unwrap(), path).await
    }

    async fn handshake(mut tcp: TcpStream, path: &str) -> RawClient {
        tcp.write_all(&upgrade_request(path, "")).await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(WAIT, tcp.read(&mut byte))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                n,
                1,
                "closed during handshake: {:?}",
                String::from_utf8_lossy(&head)
            );
            head.push(byte[0]);
        }
        assert_eq!(status_of(&head), 101, "{}", String::from_utf8_lossy(&head));
        RawClient { tcp }
    }

    /// Writes one frame. `mask` applies the client masking key 0x01020304.
    pub async fn send_frame(&mut self, first_byte: u8, payload: &[u8], mask: bool) {
        let mut frame = vec![first_byte];
        let mask_bit = if mask { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => frame.push(mask_bit | n as u8),
            n if n < 65536 => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let key = [1u8, 2, 3, 4];
        if mask {
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            frame.extend_from_slice(payload);
        }
        let _ = self.tcp.write_all(&frame).await;
    }

    /// Reads frames until a whole Close has arrived and returns its code, or `None` if the
    /// connection ends without one. Returns as soon as the Close is complete, instead of
    /// waiting for the peer to give up on the close handshake; fails the test after [`WAIT`].
    pub async fn close_code(&mut self) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut bytes = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            if let Some(code) = find_close_code(&bytes) {
                return Some(code);
            }
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut buffer)).await {
                Err(_) => panic!("no close in time; got {bytes:02x?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(n)) => bytes.extend_from_slice(&buffer[..n]),
            }
        }
    }
}

/// Finds the first server Close frame in a byte stream of unmasked server frames.
pub fn find_close_code(mut bytes: &[u8]) -> Option<u16> {
    while bytes.len() >= 2 {
        let opcode = bytes[0] & 0x0F;
        let (len, header) = match bytes[1] & 0x7F {
            126 if bytes.len() >= 4 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 if bytes.len() >= 10 => (
                u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n if n < 126 => (n as usize, 2),
            _ => return None,
        };
        let payload = bytes.get(header..header + len)?;
        if opcode == 0x8 {
            return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        }
        bytes = &bytes[header + len..];
    }
    None
}
