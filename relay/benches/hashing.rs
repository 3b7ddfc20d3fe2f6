//! Rendezvous ranking (`wsrelay::hashing::Ranking`): what every new client costs to place, for
//! upstreams of a few to many backends, equal weights (the integer order) and unequal ones
//! (the logarithmic method).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use wsrelay::hashing::Ranking;

fn urls(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| format!("ws://127.0.0.{}:{}/", 1 + i / 200, 9000 + i))
        .collect()
}

fn rank(c: &mut Criterion) {
    let mut group = c.benchmark_group("rank");
    // A client address as `hash_key = "remote_addr"` hands it over.
    let key = b"203.0.113.77";
    for count in [2usize, 8, 64] {
        let urls = urls(count);
        let uniform = Ranking::new(urls.iter().map(|u| (u.as_str(), 1.0)));
        group.bench_with_input(BenchmarkId::new("uniform", count), &uniform, |b, r| {
            b.iter(|| r.rank(black_box(key)))
        });
        let weighted = Ranking::new(
            urls.iter()
                .enumerate()
                .map(|(i, u)| (u.as_str(), 1.0 + (i % 3) as f64)),
        );
        group.bench_with_input(BenchmarkId::new("weighted", count), &weighted, |b, r| {
            b.iter(|| r.rank(black_box(key)))
        });
    }
    group.finish();
}

fn build(c: &mut Criterion) {
    // A reload or a DNS change rebuilds the ranking of an upstream.
    let urls = urls(64);
    c.bench_function("build/uniform/64", |b| {
        b.iter(|| Ranking::new(black_box(&urls).iter().map(|u| (u.as_str(), 1.0))))
    });
}

criterion_group!(benches, rank, build);
criterion_main!(benches);
