//! The bit-vector VAE's pixel likelihood, forward + backward through Burn's autodiff, for 64
//! decoded examples of 784 pixels with 256 values from a rank-5 projection: the fused CPU
//! kernel against the materialized `[64·784, 256]` logits.
//!
//! Run on one thread: `RAYON_NUM_THREADS=1 cargo bench -p lvm-core --bench likelihood`.

use burn::tensor::{Device, Distribution, Tensor};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lvm_core::likelihood::{pixel_nll_fused, pixel_nll_materialized};

fn bench(c: &mut Criterion) {
    let device = Device::flex().autodiff();
    let (examples, pixels, rank, values) = (64, 784, 5, 256);
    let targets: Vec<u8> = (0..examples * pixels)
        .map(|i| (i * 37 % values) as u8)
        .collect();
    let h = Tensor::<3>::random([examples, pixels, rank], Distribution::Default, &device);
    let w = Tensor::<2>::random([rank, values], Distribution::Default, &device);
    let b = Tensor::<1>::random([values], Distribution::Default, &device);
    let mut group = c.benchmark_group("pixel_nll_64_examples");
    for fused in [true, false] {
        let name = if fused { "fused" } else { "materialized" };
        group.bench_function(BenchmarkId::from_parameter(name), |bench| {
            bench.iter(|| {
                let (h, w, b) = (
                    h.clone().require_grad(),
                    w.clone().require_grad(),
                    b.clone().require_grad(),
                );
                let nll = if fused {
                    pixel_nll_fused(h.clone(), w, b, &targets).unwrap()
                } else {
                    pixel_nll_materialized(h.clone(), w, b, &targets)
                };
                h.grad(&nll.sum().backward()).unwrap().into_data()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
