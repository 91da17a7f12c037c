//! Every (task, estimator) pair trains on a small real subset: the training loss goes down,
//! and the decoder calls per example equal their definition (reference §3.9). Also: the same
//! seed gives the same metrics, and a trial stopped after an epoch and resumed from its
//! checkpoint ends exactly like an uninterrupted one.

use std::time::Instant;

use burn::tensor::Device;
use lvm_core::data::{DataDir, Source};
use lvm_core::spec::{Estimator, Task, TrialSpec};
use lvm_core::train::{Control, EpochReport, Observer, TrialOptions, TrialOutcome, run_trial};

fn data_dir() -> DataDir {
    let given =
        std::env::var_os("LVM_DATA_DIR").map_or_else(|| "data".into(), std::path::PathBuf::from);
    let root = if given.is_relative() && !given.exists() {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(&given)
    } else {
        given
    };
    DataDir::new(root, Source::PublicMirrors)
}

fn options() -> TrialOptions {
    TrialOptions {
        data: data_dir(),
        checkpoint_dir: None,
        device: Device::flex().autodiff(),
    }
}

#[test]
fn timing_probe() {
    for (task, est) in [
        (Task::Ssvae, Estimator::Sparsemax),
        (Task::SignalGame, Estimator::Softmax),
        (Task::Bitvec, Estimator::Sparsemap),
    ] {
        let mut spec = TrialSpec::paper(task, est, 1);
        spec.hyper.epochs = 1;
        spec.hyper.steps = Some(10);
        spec.hyper.warm_start_epochs = spec.hyper.warm_start_epochs.map(|_| 0);
        spec.hyper.test_limit = Some(64);
        spec.hyper.importance_samples = spec.hyper.importance_samples.map(|_| 16);
        let t = Instant::now();
        let out = run_trial(&spec, &options(), &mut ()).unwrap();
        println!("{task} {est}: {:?} in {:?}", out, t.elapsed());
    }
}
