//! SparseMAP solves for a batch of 64 examples at D = 32 and D = 128, scores drawn N(0, 1) and
//! N(0, 4) (standard deviations 1 and 2), without a budget and with one (16 at D = 32, 64 at
//! D = 128), from a random initial vertex (the original's setting) and from the MAP vertex,
//! `max_iter` 300: one iteration = one batched `sparsemap` call. Before timing, each case
//! prints its mean support size to stderr.
//!
//! Run on one thread: `RAYON_NUM_THREADS=1 cargo bench -p lvm-core --bench sparsemap`.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lvm_core::mappings::sparsemap::sparsemap;
use lvm_core::mappings::{Init, SparseMapOptions};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("sparsemap_batch64");
    for (bits, budget) in [(32, 16), (128, 64)] {
        for variance in [1.0f32, 4.0] {
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let normal = Normal::new(0.0f32, variance.sqrt()).unwrap();
            let scores: Vec<f32> = (0..64 * bits).map(|_| normal.sample(&mut rng)).collect();
            for budget in [None, Some(budget)] {
                for (init_name, init) in [("random", Init::Random { seed: 4 }), ("map", Init::Map)]
                {
                    let options = SparseMapOptions {
                        budget,
                        max_iter: 300,
                        init,
                    };
                    let label = format!(
                        "D{bits}_var{variance}_budget{}_{init_name}",
                        budget.map_or("none".to_string(), |b| b.to_string())
                    );
                    let solutions = sparsemap(&scores, bits, &options).unwrap();
                    let support: usize = solutions.iter().map(|s| s.support().len()).sum();
                    let converged = solutions.iter().filter(|s| s.converged).count();
                    eprintln!(
                        "{label}: mean support {:.1}, converged {converged}/64",
                        support as f64 / 64.0
                    );
                    group.bench_function(BenchmarkId::from_parameter(label), |b| {
                        b.iter(|| sparsemap(&scores, bits, &options).unwrap())
                    });
                }
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
