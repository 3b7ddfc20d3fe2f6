//! The relay's pump between two in-memory WebSockets: a client WebSocket and a backend
//! WebSocket over `tokio::io::duplex` pipes, the pump (`wsrelay::benching::pump`) in between,
//! an echo task at the backend's end. What an echo costs the relay's frame path alone:
//! decoding and unmasking the client's frame, re-masking and encoding it for the backend, and
//! the same back, plus the client's and the echo's own framing. No sockets, no syscalls.
//!
//! `echo`: one message in flight; `burst`: 32 sent before the first answer is read, so the
//! pump can gather writes before it flushes.

use std::time::Instant;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::{SinkExt, StreamExt};
use tokio::io::DuplexStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// Bytes each duplex pipe buffers per direction: a socket buffer's order of size.
const PIPE: usize = 256 * 1024;

const BURST: usize = 32;

/// The client's WebSocket, with the pump and an echo backend running behind it on `rt`.
async fn relayed_client() -> WebSocketStream<DuplexStream> {
    let (client_end, relay_client_end) = tokio::io::duplex(PIPE);
    let (relay_backend_end, backend_end) = tokio::io::duplex(PIPE);
    let client = WebSocketStream::from_raw_socket(client_end, Role::Client, None).await;
    let mut backend = WebSocketStream::from_raw_socket(backend_end, Role::Server, None).await;
    tokio::spawn(async move {
        // The relay's settings: 4 KiB reads were tungstenite's, 16 KiB write batches.
        let config = WebSocketConfig::default().write_buffer_size(16 * 1024);
        wsrelay::benching::pump(relay_client_end, relay_backend_end, &config).await;
    });
    tokio::spawn(async move {
        while let Some(Ok(message)) = backend.next().await {
            if (message.is_binary() || message.is_text()) && backend.send(message).await.is_err() {
                break;
            }
        }
    });
    client
}

fn pump(c: &mut Criterion) {
    // One thread, as one relay worker: wakeups stay on it, and the figure is per core.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("pump");
    for size in [64usize, 4096] {
        let payload = Bytes::from(vec![0x5a; size]);
        let mut client = rt.block_on(relayed_client());
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("echo", size), &payload, |b, payload| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        client
                            .send(Message::Binary(payload.clone()))
                            .await
                            .expect("send");
                        let answer = client.next().await.expect("an answer").expect("echo");
                        assert_eq!(answer.len(), size);
                    }
                    start.elapsed()
                })
            })
        });
        group.throughput(Throughput::Elements(BURST as u64));
        group.bench_with_input(BenchmarkId::new("burst32", size), &payload, |b, payload| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        for _ in 0..BURST {
                            client
                                .feed(Message::Binary(payload.clone()))
                                .await
                                .expect("send");
                        }
                        client.flush().await.expect("flush");
                        for _ in 0..BURST {
                            let answer = client.next().await.expect("an answer").expect("echo");
                            assert_eq!(answer.len(), size);
                        }
                    }
                    start.elapsed()
                })
            })
        });
        rt.block_on(async {
            let _ = client.close(None).await;
        });
    }
    group.finish();
}

criterion_group!(benches, pump);
criterion_main!(benches);
