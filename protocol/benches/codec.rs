//! Frame codecs on the relay's path, with no I/O: the mux codec (`encode_into`, `decode_all`)
//! for one `Data` frame and a link message of 16, and tungstenite's WebSocket framing of 64 B
//! and 4 KiB binary messages: encoding as a client (masked) and decoding as a server
//! (unmasked, checked), through `tungstenite::WebSocket` over an in-memory stream, as the
//! relay's legs do over sockets.

use std::hint::black_box;
use std::io::{self, Read, Write};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tungstenite::Message;
use tungstenite::protocol::{Role, WebSocket};
use wsrelay_protocol::{Frame, Limits, decode_all, encode_into};

const SIZES: [usize; 2] = [64, 4096];

fn data(stream: u64, size: usize) -> Frame {
    Frame::Data {
        stream,
        text: false,
        payload: Bytes::from(vec![0x5a; size]),
    }
}

fn mux(c: &mut Criterion) {
    let limits = Limits::default();
    let mut group = c.benchmark_group("mux");
    for size in SIZES {
        let frame = data(7, size);
        let mut out = Vec::with_capacity(frame.encoded_len() * 16);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &frame, |b, frame| {
            b.iter(|| {
                out.clear();
                encode_into(black_box(frame), &mut out);
            })
        });
        let mut one = Vec::new();
        encode_into(&frame, &mut one);
        let one = Bytes::from(one);
        group.bench_with_input(BenchmarkId::new("decode", size), &one, |b, message| {
            b.iter(|| {
                for frame in decode_all(black_box(message.clone()), &limits) {
                    black_box(frame.expect("a valid frame"));
                }
            })
        });
        // A link message carries many streams' frames; decoding slices them without copying.
        let mut batch = Vec::new();
        for stream in 1..=16 {
            encode_into(&data(stream, size), &mut batch);
        }
        let batch = Bytes::from(batch);
        group.throughput(Throughput::Bytes(16 * size as u64));
        group.bench_with_input(BenchmarkId::new("decode16", size), &batch, |b, message| {
            b.iter(|| {
                for frame in decode_all(black_box(message.clone()), &limits) {
                    black_box(frame.expect("a valid frame"));
                }
            })
        });
    }
    group.finish();
}

/// Swallows what is written, and reads the same bytes over and over: a peer that sends one
/// frame forever.
struct Loop {
    input: Vec<u8>,
    at: usize,
    written: usize,
}

impl Read for Loop {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            let take = (self.input.len() - self.at).min(buf.len() - n);
            buf[n..n + take].copy_from_slice(&self.input[self.at..self.at + take]);
            n += take;
            self.at = (self.at + take) % self.input.len();
        }
        Ok(n)
    }
}

impl Write for Loop {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn websocket(c: &mut Criterion) {
    let mut group = c.benchmark_group("websocket");
    for size in SIZES {
        let payload = Bytes::from(vec![0x5a; size]);
        group.throughput(Throughput::Bytes(size as u64));

        let sink = Loop {
            input: vec![0],
            at: 0,
            written: 0,
        };
        let mut client = WebSocket::from_raw_socket(sink, Role::Client, None);
        // Checked before the run, not after: a filtered run (`cargo bench -- mux`) never
        // calls the routine.
        client.send(Message::Binary(payload.clone())).expect("send");
        assert!(client.get_ref().written > size);
        group.bench_with_input(
            BenchmarkId::new("encode_masked", size),
            &payload,
            |b, payload| {
                b.iter(|| {
                    client
                        .send(Message::Binary(black_box(payload.clone())))
                        .expect("send")
                })
            },
        );

        // One masked frame, as a client sends it, for the server side to read forever.
        let mut recorder =
            WebSocket::from_raw_socket(io::Cursor::new(Vec::new()), Role::Client, None);
        recorder
            .send(Message::Binary(payload.clone()))
            .expect("encode");
        let frame = recorder.get_ref().get_ref().clone();
        let source = Loop {
            input: frame,
            at: 0,
            written: 0,
        };
        let mut server = WebSocket::from_raw_socket(source, Role::Server, None);
        group.bench_function(BenchmarkId::new("decode_unmask", size), |b| {
            b.iter(|| {
                let message = server.read().expect("a message");
                assert_eq!(message.len(), size);
                black_box(message)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, mux, websocket);
criterion_main!(benches);
