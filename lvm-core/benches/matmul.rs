//! The multiply rate of the default CPU backend (flex): `[128, 784] × [784, 256]` and
//! `[2048, 128] × [128, 3920]` float32 products, the shapes that dominate training steps.
//! GFLOP/s = 2·m·k·n / time; criterion reports it as element throughput (1 element = 1 flop).
//!
//! Run on one thread: `RAYON_NUM_THREADS=1 cargo bench -p lvm-core --bench matmul`.

use burn::tensor::{Device, Distribution, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let device = Device::flex();
    let mut group = c.benchmark_group("flex_matmul");
    for (m, k, n) in [(128, 784, 256), (2048, 128, 3920)] {
        let a = Tensor::<2>::random([m, k], Distribution::Default, &device);
        let b = Tensor::<2>::random([k, n], Distribution::Default, &device);
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        group.bench_function(
            BenchmarkId::from_parameter(format!("{m}x{k}x{n}")),
            |bench| bench.iter(|| a.clone().matmul(b.clone()).into_data()),
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
