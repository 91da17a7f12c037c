//! `worker run`: one trial from command-line flags. The flags override the paper's settings
//! for the (task, estimator) pair; the combination is validated before any data is read.
//! Per-epoch lines go to stdout (with a progress bar on stderr when it is a terminal); with
//! `--json` the last line of stdout is one JSON object with the final metrics.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::Device;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lvm_core::data::DataDir;
use lvm_core::spec::{Estimator, Task, TrialSpec};
use lvm_core::tasks::{Stage, StepOutcome};
use lvm_core::train::{Control, EpochReport, Observer, TrialOptions, TrialOutcome, run_trial};
use serde::Serialize;

/// Flags of `worker run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Task: ssvae, signal_game or bitvec.
    #[arg(long)]
    pub task: Task,
    /// Estimator (see README for which apply to which task).
    #[arg(long)]
    pub estimator: Estimator,
    /// Seed of every random choice.
    #[arg(long)]
    pub seed: u64,
    /// Epochs of the main stage.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Cap on optimizer steps of the main stage.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Batch size.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Bits of the bit-vector latent (32 or 128 in the paper).
    #[arg(long)]
    pub bits: Option<usize>,
    /// SparseMAP budget: at most this many bits on.
    #[arg(long)]
    pub budget: Option<usize>,
    /// k of top-k sparsemax or Sum&Sample.
    #[arg(long)]
    pub k: Option<usize>,
    /// Epochs of the SSVAE's labelled-only warm start.
    #[arg(long)]
    pub warm_start_epochs: Option<usize>,
    /// Importance samples per test example for the bit-vector NLL.
    #[arg(long)]
    pub importance_samples: Option<usize>,
    /// Evaluate on the first N test examples (games for the signalling game).
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Dataset directory (default: $LVM_DATA_DIR, else ./data).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Images per signalling game, target included (the paper uses 16).
    #[arg(long)]
    pub game_size: Option<usize>,
    /// Signalling game only: a directory with train_features.npy, train_labels.npy,
    /// test_features.npy and test_labels.npy to use instead of the default images.
    #[arg(long)]
    pub game_features: Option<PathBuf>,
    /// Keep a checkpoint here at every epoch and resume from it if present.
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Print the final metrics as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

impl RunArgs {
    /// The trial these flags describe, validated.
    pub fn spec(&self) -> Result<TrialSpec> {
        let mut spec = TrialSpec::paper(self.task, self.estimator, self.seed);
        if let Some(bits) = self.bits {
            spec = spec.with_bits(bits);
        }
        let h = &mut spec.hyper;
        if let Some(v) = self.epochs {
            h.epochs = v;
        }
        if self.steps.is_some() {
            h.steps = self.steps;
        }
        if let Some(v) = self.lr {
            h.lr = v;
        }
        if let Some(v) = self.batch_size {
            h.batch_size = v;
        }
        if self.budget.is_some() {
            h.budget = self.budget;
        }
        if self.k.is_some() {
            h.k = self.k;
        }
        if self.warm_start_epochs.is_some() {
            h.warm_start_epochs = self.warm_start_epochs;
        }
        if self.importance_samples.is_some() {
            h.importance_samples = self.importance_samples;
        }
        if self.test_limit.is_some() {
            h.test_limit = self.test_limit;
        }
        if self.game_size.is_some() {
            h.game_size = self.game_size;
        }
        spec.validate().context("invalid trial")?;
        if self.game_features.is_some() && spec.task != Task::SignalGame {
            anyhow::bail!("--game-features applies to the signal_game task only");
        }
        Ok(spec)
    }
}

/// The JSON object `--json` prints.
#[derive(Debug, Serialize)]
struct Summary<'a> {
    task: Task,
    estimator: Estimator,
    seed: u64,
    metrics: &'a lvm_core::tasks::Metrics,
    wall_seconds: f64,
}

/// Prints epochs and drives the progress bar.
struct Printer {
    bar: ProgressBar,
    stage: Option<Stage>,
}

impl Observer for Printer {
    fn on_step(&mut self, stage: Stage, _outcome: &StepOutcome, done: u64, total: u64) {
        if self.stage != Some(stage) {
            self.stage = Some(stage);
            self.bar.set_length(total);
            self.bar.set_message(stage.name());
        }
        self.bar.set_position(done);
    }

    fn on_epoch(&mut self, r: &EpochReport) -> Control {
        self.bar.suspend(|| {
            println!(
                "{} epoch {:>3}  steps {:>5}  loss {:>12.4}  decoder_calls {:>7.3}  {:>7.1}s",
                r.stage.name(),
                r.epoch + 1,
                r.steps,
                r.objective,
                r.decoder_calls,
                r.seconds
            );
        });
        Control::Continue
    }
}

/// Trains the trial and prints its metrics.
pub fn run(args: &RunArgs) -> Result<()> {
    let spec = args.spec()?;
    let started = Instant::now();
    let span = tracing::info_span!("trial", task = %spec.task, estimator = %spec.estimator,
        seed = spec.seed);
    let _entered = span.enter();
    let options = TrialOptions {
        data: DataDir::resolve(args.data_dir.clone()),
        checkpoint_dir: args.checkpoint_dir.clone(),
        game_features: args.game_features.clone(),
        device: Device::flex().autodiff(),
    };
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps, eta {eta}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut printer = Printer { bar, stage: None };
    let outcome = run_trial(&spec, &options, &mut printer)
        .with_context(|| format!("trial {} {} seed {}", spec.task, spec.estimator, spec.seed))?;
    printer.bar.finish_and_clear();
    let TrialOutcome::Finished(result) = outcome else {
        anyhow::bail!("the trial stopped before finishing");
    };
    let wall_seconds = started.elapsed().as_secs_f64();
    let mut out = std::io::stdout().lock();
    for (name, value) in &result.metrics {
        writeln!(out, "{name:<24} {value:.6}")?;
    }
    writeln!(out, "{:<24} {wall_seconds:.1}", "wall_seconds")?;
    if args.json {
        let summary = Summary {
            task: spec.task,
            estimator: spec.estimator,
            seed: spec.seed,
            metrics: &result.metrics,
            wall_seconds,
        };
        writeln!(out, "{}", serde_json::to_string(&summary)?)?;
    }
    Ok(())
}
