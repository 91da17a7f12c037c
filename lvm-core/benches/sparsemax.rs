//! Sparsemax forward + backward through Burn's autodiff on the default CPU device (flex), on
//! `[64, 10]`, `[64, 256]` and `[1024, 256]` scores drawn uniformly from `[-2, 2)`: one
//! iteration = `sparsemax(z)`, a weighted sum, and `backward()`.
//!
//! Run on one thread: `RAYON_NUM_THREADS=1 cargo bench -p lvm-core --bench sparsemax`.

use burn::tensor::{Device, Tensor, TensorData};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn bench(c: &mut Criterion) {
    let device = Device::flex().autodiff();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut group = c.benchmark_group("sparsemax_forward_backward");
    for (rows, k) in [(64, 10), (64, 256), (1024, 256)] {
        let z: Vec<f32> = (0..rows * k)
            .map(|_| rng.random_range(-2.0f32..2.0))
            .collect();
        let g: Vec<f32> = (0..rows * k)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let upstream = Tensor::<2>::from_data(TensorData::new(g, [rows, k]), &device);
        group.bench_function(BenchmarkId::from_parameter(format!("{rows}x{k}")), |b| {
            b.iter(|| {
                let z = Tensor::<2>::from_data(TensorData::new(z.clone(), [rows, k]), &device)
                    .require_grad();
                let p = lvm_core::mappings::sparsemax(z.clone()).unwrap();
                let grads = p.mul(upstream.clone()).sum().backward();
                z.grad(&grads).unwrap().into_data()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
