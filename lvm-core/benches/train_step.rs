//! Milliseconds per training step (forward, estimator, backward, Adam) for every (task,
//! estimator) pair at the paper's batch size, on the real datasets, with the mean decoder
//! calls per example (the support, for the sparse estimators) seen while measuring. The
//! SSVAE is measured after 400 labelled-only warm-start steps, where the classifier is
//! confident, as the paper's runs are; the others from initialization.
//!
//! Run on one thread: `RAYON_NUM_THREADS=1 LVM_DATA_DIR=... cargo bench -p lvm-core --bench
//! train_step`. The supports print to stderr as `support <task>/<estimator>: <calls>`.
//! `TRAIN_STEP_ONLY=<text>` keeps the pairs whose name contains it; `TRAIN_STEP_PRETRAIN=N`
//! trains N main-stage steps before measuring (the sparse estimators' support shrinks as
//! training goes on); `TRAIN_STEP_K=K` sets k for the pairs that have one (top-k sparsemax
//! and Sum&Sample), which bounds top-k sparsemax's support by K; `TRAIN_STEP_BITS=D` gives
//! the bit-vector VAE D bits with the paper's settings for D (32 by default; at 128 the
//! SparseMAP pairs use the paper's batch of 16).

use std::time::{Duration, Instant};

use burn::tensor::Device;
use criterion::{Criterion, criterion_group, criterion_main};
use lvm_core::data::{DataDir, Source};
use lvm_core::spec::{Task, TrialSpec};
use lvm_core::tasks::{self, EpochRng, Stage};

fn data_dir() -> DataDir {
    let root: std::path::PathBuf =
        std::env::var_os("LVM_DATA_DIR").map_or_else(|| "data".into(), Into::into);
    DataDir::new(root, Source::PublicMirrors)
}

fn bench(c: &mut Criterion) {
    let device = Device::flex().autodiff();
    let data = data_dir();
    let only = std::env::var("TRAIN_STEP_ONLY").ok();
    let pretrain: usize = std::env::var("TRAIN_STEP_PRETRAIN").map_or(0, |n| n.parse().unwrap());
    let k: Option<usize> = std::env::var("TRAIN_STEP_K")
        .ok()
        .map(|n| n.parse().unwrap());
    let bits: Option<usize> = std::env::var("TRAIN_STEP_BITS")
        .ok()
        .map(|n| n.parse().unwrap());
    let mut group = c.benchmark_group("train_step");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500));
    for task in Task::ALL {
        for &estimator in task.estimators() {
            let mut spec = TrialSpec::paper(task, estimator, 42);
            let mut name = format!("{task}/{estimator}");
            if let (Some(bits), Task::Bitvec) = (bits, task) {
                spec = spec.with_bits(bits);
                name.push_str(&format!("/d_{bits}"));
            }
            if let (Some(k), Some(_)) = (k, spec.hyper.k) {
                spec.hyper.k = Some(k);
                name.push_str(&format!("/k_{k}"));
            }
            if pretrain > 0 {
                name.push_str(&format!("/after_{pretrain}_steps"));
            }
            if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
                continue;
            }
            let mut model = tasks::build(&spec, &data, None, &device).expect("data and spec");
            let plan = model.plan();
            if task == Task::Ssvae {
                let mut rng = EpochRng::new(42, Stage::WarmStart, 0);
                let per_epoch = plan[0].steps_per_epoch;
                for i in 0..400 {
                    model
                        .train_step(Stage::WarmStart, i % per_epoch, &mut rng)
                        .unwrap();
                }
            }
            let per_epoch = plan.last().unwrap().steps_per_epoch;
            let mut rng = EpochRng::new(42, Stage::Main, 0);
            let (mut step, mut calls, mut examples) = (0usize, 0usize, 0usize);
            for _ in 0..pretrain {
                model.set_global_step(step as u64);
                model
                    .train_step(Stage::Main, step % per_epoch, &mut rng)
                    .unwrap();
                step += 1;
            }
            group.bench_function(&name, |b| {
                b.iter_custom(|iterations| {
                    let started = Instant::now();
                    for _ in 0..iterations {
                        model.set_global_step(step as u64);
                        let out = model
                            .train_step(Stage::Main, step % per_epoch, &mut rng)
                            .unwrap();
                        calls += out.decoder_calls;
                        examples += out.examples;
                        step += 1;
                    }
                    started.elapsed()
                })
            });
            eprintln!(
                "support {name}: {:.2}",
                calls as f64 / examples.max(1) as f64
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
