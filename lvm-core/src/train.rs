//! The training loop of one trial, the same for every task: run each stage's epochs, report
//! each epoch to an [`Observer`], write a checkpoint at every epoch boundary, evaluate at the
//! end. A trial given a checkpoint directory resumes from the last checkpoint there and ends
//! with the same metrics as an uninterrupted run, because every epoch draws its randomness
//! from streams fixed by (seed, stage, epoch) and the checkpoint carries parameters,
//! optimizer moments and estimator state.
//!
//! `--steps N` caps the optimizer steps of the main stage: the trial stops after step `N`,
//! possibly inside an epoch, and evaluates.

use std::time::Instant;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, CheckpointFile};
use crate::data::DataDir;
use crate::spec::TrialSpec;
use crate::tasks::{self, EpochRng, Metrics, Stage, StepOutcome, TaskModel, TrainError};

/// Where a trial reads data, keeps checkpoints and computes.
#[derive(Debug, Clone)]
pub struct TrialOptions {
    /// The dataset directory.
    pub data: DataDir,
    /// A directory for the trial's checkpoint (`None`: no checkpoints).
    pub checkpoint_dir: Option<std::path::PathBuf>,
    /// A directory of signalling-game features to use instead of the default images.
    pub game_features: Option<std::path::PathBuf>,
    /// The device (with autodiff) to train on.
    pub device: Device,
}

/// One finished epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// The stage.
    pub stage: Stage,
    /// Epoch number within the stage (0-based).
    pub epoch: usize,
    /// Optimizer steps taken in this epoch.
    pub steps: usize,
    /// Mean training objective over the epoch's steps.
    pub objective: f64,
    /// Mean decoder calls per example in this epoch (0 in the warm start).
    pub decoder_calls: f64,
    /// Wall-clock seconds of the epoch (not part of the trial's determinism).
    pub seconds: f64,
}

/// What an observer tells the loop after an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Go on.
    Continue,
    /// Stop now: the checkpoint of this epoch is written, the trial is left resumable.
    Stop,
}

/// Watches a trial's progress.
pub trait Observer {
    /// After each optimizer step: what it produced, steps done and total steps of the stage.
    fn on_step(&mut self, _stage: Stage, _outcome: &StepOutcome, _done: u64, _total: u64) {}
    /// After each epoch (and after its checkpoint is written).
    fn on_epoch(&mut self, _report: &EpochReport) -> Control {
        Control::Continue
    }
}

/// An observer that watches nothing.
impl Observer for () {}

/// How a trial ended.
#[derive(Debug, Clone, PartialEq)]
pub enum TrialOutcome {
    /// Trained and evaluated.
    Finished(TrialResult),
    /// Stopped by the observer at an epoch boundary; the checkpoint holds the progress.
    Stopped {
        /// Epochs completed, all stages together.
        epochs_done: usize,
    },
}

/// A finished trial's metrics and history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialResult {
    /// Test metrics, plus `decoder_calls` (mean per example over the main stage).
    pub metrics: Metrics,
    /// Every epoch, in order (including epochs run before a resume).
    pub epochs: Vec<EpochReport>,
}

/// Trains and evaluates one trial.
pub fn run_trial(
    spec: &TrialSpec,
    options: &TrialOptions,
    observer: &mut dyn Observer,
) -> Result<TrialOutcome, TrainError> {
    spec.validate()?;
    let features = options.game_features.as_deref();
    let model = tasks::build(spec, &options.data, features, &options.device)?;
    run_model(model, spec, options, observer)
}

/// Trains and evaluates `model`, built for `spec`: the loop of [`run_trial`].
pub fn run_model(
    mut model: Box<dyn TaskModel>,
    spec: &TrialSpec,
    options: &TrialOptions,
    observer: &mut dyn Observer,
) -> Result<TrialOutcome, TrainError> {
    let file = options
        .checkpoint_dir
        .as_ref()
        .map(|dir| CheckpointFile::new(dir, spec));
    let mut progress = Progress::default();
    if let Some(file) = &file
        && let Some(checkpoint) = file.load()?
    {
        model.restore(checkpoint.model)?;
        progress = checkpoint.progress;
    }

    let plan = model.plan();
    let cap = spec.hyper.steps;
    let mut epoch_index = 0;
    for stage in &plan {
        let total = (stage.epochs * stage.steps_per_epoch) as u64;
        let total = match (stage.stage, cap) {
            (Stage::Main, Some(cap)) => total.min(cap),
            _ => total,
        };
        for epoch in 0..stage.epochs {
            let first_step = (epoch * stage.steps_per_epoch) as u64;
            if epoch_index < progress.epochs.len() || first_step >= total {
                epoch_index += usize::from(first_step < total);
                continue;
            }
            let started = Instant::now();
            let mut rng = EpochRng::new(spec.seed, stage.stage, epoch);
            let (mut objective, mut calls, mut examples, mut steps) = (0.0, 0usize, 0usize, 0);
            for index in 0..stage.steps_per_epoch {
                let step = first_step + index as u64;
                if step >= total {
                    break;
                }
                if stage.stage == Stage::Main {
                    model.set_global_step(step);
                }
                let outcome = model
                    .train_step(stage.stage, index, &mut rng)
                    .map_err(|e| TrainError::AtStep {
                        stage: stage.stage.name(),
                        epoch,
                        step,
                        source: Box::new(e),
                    })?;
                if !outcome.objective.is_finite() {
                    return Err(TrainError::NonFiniteLoss {
                        stage: stage.stage.name(),
                        epoch,
                        step,
                        value: outcome.objective,
                    });
                }
                objective += outcome.objective;
                calls += outcome.decoder_calls;
                examples += outcome.examples;
                steps += 1;
                observer.on_step(stage.stage, &outcome, step + 1, total);
            }
            if stage.stage == Stage::Main {
                model.set_global_step(first_step + steps as u64);
                progress.decoder_calls += calls as u64;
                progress.examples += examples as u64;
            }
            let report = EpochReport {
                stage: stage.stage,
                epoch,
                steps,
                objective: objective / steps.max(1) as f64,
                decoder_calls: calls as f64 / examples.max(1) as f64,
                seconds: started.elapsed().as_secs_f64(),
            };
            progress.epochs.push(report.clone());
            epoch_index += 1;
            if let Some(file) = &file {
                file.save(&Checkpoint {
                    progress: progress.clone(),
                    model: model.state()?,
                })?;
            }
            if observer.on_epoch(&report) == Control::Stop {
                return Ok(TrialOutcome::Stopped {
                    epochs_done: epoch_index,
                });
            }
        }
    }

    let mut metrics = model.evaluate(&mut EpochRng::evaluation(spec.seed))?;
    let calls = progress.decoder_calls as f64 / progress.examples.max(1) as f64;
    metrics.insert("decoder_calls".into(), calls);
    Ok(TrialOutcome::Finished(TrialResult {
        metrics,
        epochs: progress.epochs,
    }))
}

/// What a trial has done so far, as a checkpoint carries it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Every finished epoch.
    pub epochs: Vec<EpochReport>,
    /// Decoder calls of the main stage so far.
    pub decoder_calls: u64,
    /// Examples the main stage's estimator has seen so far.
    pub examples: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::MappingError;
    use crate::spec::{Estimator, Task};
    use crate::tasks::{ModelState, StagePlan};

    /// A model whose step `fail_at` of every epoch returns a NaN loss or an error.
    struct Failing {
        fail_at: usize,
        nan: bool,
    }

    impl TaskModel for Failing {
        fn plan(&self) -> Vec<StagePlan> {
            let stage = Stage::Main;
            vec![StagePlan {
                stage,
                epochs: 3,
                steps_per_epoch: 4,
            }]
        }

        fn train_step(
            &mut self,
            _stage: Stage,
            index: usize,
            _rng: &mut EpochRng,
        ) -> Result<StepOutcome, TrainError> {
            if index == self.fail_at {
                if !self.nan {
                    return Err(MappingError::NonFiniteScore {
                        row: 0,
                        col: 1,
                        value: f32::NAN,
                    }
                    .into());
                }
                let outcome = StepOutcome {
                    objective: f64::NAN,
                    decoder_calls: 1,
                    examples: 1,
                };
                return Ok(outcome);
            }
            Ok(StepOutcome {
                objective: 1.0,
                decoder_calls: 1,
                examples: 1,
            })
        }

        fn evaluate(&mut self, _rng: &mut EpochRng) -> Result<Metrics, TrainError> {
            Ok(Metrics::new())
        }

        fn set_global_step(&mut self, _step: u64) {}

        fn state(&self) -> Result<ModelState, TrainError> {
            unreachable!("no checkpoint directory")
        }

        fn restore(&mut self, _state: ModelState) -> Result<(), TrainError> {
            unreachable!("no checkpoint directory")
        }

        fn warm_start(&mut self, _parameters: &[u8]) -> Result<(), TrainError> {
            Ok(())
        }
    }

    #[test]
    fn a_non_finite_loss_or_a_failed_step_stops_the_trial_naming_the_step() {
        let spec = TrialSpec::paper(Task::Bitvec, Estimator::Sfe, 1);
        let options = TrialOptions {
            data: crate::data::DataDir::new("unused", crate::data::Source::Offline),
            checkpoint_dir: None,
            game_features: None,
            device: burn::tensor::Device::flex().autodiff(),
        };
        let nan = Box::new(Failing {
            fail_at: 2,
            nan: true,
        });
        let err = run_model(nan, &spec, &options, &mut ())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "the main loss is NaN at step 2 (epoch 0): training diverged"
        );

        let failing = Box::new(Failing {
            fail_at: 3,
            nan: false,
        });
        let err = run_model(failing, &spec, &options, &mut ())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("main step 3 (epoch 0) failed: "), "{err}");
        assert!(err.contains("row 0"), "{err}");
    }
}
