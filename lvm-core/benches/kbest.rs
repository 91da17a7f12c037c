//! The k-best bit-vector oracle with k = 10 for a batch of 64 examples at D = 32 and D = 128,
//! scores drawn N(0, 1): one iteration = one batched `kbest` call.
//!
//! Run on one thread: `RAYON_NUM_THREADS=1 cargo bench -p lvm-core --bench kbest`.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    let mut group = c.benchmark_group("kbest_k10_batch64");
    for bits in [32, 128] {
        let scores: Vec<f32> = (0..64 * bits).map(|_| normal.sample(&mut rng)).collect();
        group.bench_function(BenchmarkId::from_parameter(format!("D{bits}")), |b| {
            b.iter(|| lvm_core::mappings::kbest::kbest(&scores, bits, 10).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
