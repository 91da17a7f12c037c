//! The three tasks of the paper (reference §7–§9) as trainable models: [`ssvae`] (the
//! semi-supervised VAE on MNIST), [`signal_game`] (the signalling game) and [`bitvec`] (the
//! bit-vector VAE on Fashion-MNIST). Each implements [`TaskModel`]: it trains one step at a
//! time through a [`LatentEstimator`](crate::estimators::latent::LatentEstimator), evaluates
//! on its test split, and turns its parameters and optimizer state into bytes and back, so
//! that the training loop in [`crate::train`] can stay the same for every task.
//!
//! Randomness is explicit. Each epoch gets its own [`EpochRng`] derived from the trial's seed,
//! the stage and the epoch number, so an epoch replayed from a checkpoint draws the same
//! shuffles, samples and noise as the first time. Parameters are initialized from the seed
//! too, never from a global generator.

/// The [`TaskModel`] methods that only involve a task's `net`, `optim`, `estimator` and
/// `spec` fields, which every task names the same way.
macro_rules! checkpointed_methods {
    () => {
        fn set_global_step(&mut self, step: u64) {
            self.estimator.set_global_step(step);
        }

        fn state(&self) -> Result<ModelState, TrainError> {
            super::ssvae::save(&self.net, &self.optim, self.estimator.as_ref())
        }

        fn restore(&mut self, state: ModelState) -> Result<(), TrainError> {
            let fresh = super::ssvae::optimizer(&self.spec);
            let (net, optim) = super::ssvae::load(self.net.clone(), fresh, &state)?;
            self.net = net;
            self.optim = optim;
            self.estimator.restore(&state.estimator);
            Ok(())
        }

        fn warm_start(&mut self, parameters: &[u8]) -> Result<(), TrainError> {
            self.net = super::ssvae::load_matching(self.net.clone(), parameters)?;
            self.optim = super::ssvae::optimizer(&self.spec);
            Ok(())
        }
    };
}
pub(crate) use checkpointed_methods;

pub mod bitvec;
pub mod layers;
pub mod signal_game;
pub mod ssvae;

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

use crate::data::{DataDir, DataError};
use crate::error::MappingError;
use crate::estimators::latent::EstimatorState;
use crate::spec::{SpecError, Task, TrialSpec};

/// Why a trial could not train.
#[derive(Debug, Error)]
pub enum TrainError {
    /// The spec is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A dataset file is missing, corrupt or unreadable.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A mapping or estimator refused its input.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// The loss stopped being finite.
    #[error("the {stage} loss is {value} at step {step} (epoch {epoch}): training diverged")]
    NonFiniteLoss {
        /// Stage name.
        stage: &'static str,
        /// Epoch (0-based) within the stage.
        epoch: usize,
        /// Optimizer step (0-based) within the stage.
        step: u64,
        /// The loss.
        value: f64,
    },
    /// A step failed, for instance on scores that stopped being finite.
    #[error("{stage} step {step} (epoch {epoch}) failed: {source}")]
    AtStep {
        /// Stage name.
        stage: &'static str,
        /// Epoch (0-based) within the stage.
        epoch: usize,
        /// Optimizer step (0-based) within the stage.
        step: u64,
        /// What failed.
        source: Box<TrainError>,
    },
    /// A checkpoint could not be written, read or applied.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// The training stages of a trial: the SSVAE's labelled-only warm start, then the main stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Labelled-only training before the semi-supervised stage (SSVAE).
    WarmStart,
    /// The estimator's own training.
    Main,
}

impl Stage {
    /// The name used in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Stage::WarmStart => "warm_start",
            Stage::Main => "main",
        }
    }
}

/// One stage's schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagePlan {
    /// Which stage.
    pub stage: Stage,
    /// Epochs.
    pub epochs: usize,
    /// Optimizer steps per epoch.
    pub steps_per_epoch: usize,
}

/// What one optimizer step produced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// The step's training loss: the batch-mean loss of the latents under the estimator's
    /// semantics (supervised terms included, entropy bonuses not).
    pub objective: f64,
    /// Decoder calls the estimator made.
    pub decoder_calls: usize,
    /// Examples the estimator saw (its decoder calls are per these).
    pub examples: usize,
}

/// The random streams of one epoch: latent samples and shuffles, and decoder noise.
#[derive(Debug, Clone)]
pub struct EpochRng {
    /// Shuffles and the estimator's samples.
    pub latent: ChaCha8Rng,
    /// Noise inside the decoder (Gaussian reparameterization, binarization).
    pub noise: ChaCha8Rng,
}

impl EpochRng {
    /// The streams for `epoch` of `stage` in a trial seeded `seed`.
    pub fn new(seed: u64, stage: Stage, epoch: usize) -> Self {
        let base = match stage {
            Stage::WarmStart => 1u64 << 40,
            Stage::Main => 2u64 << 40,
        } + 2 * epoch as u64;
        Self::streams(seed, base)
    }

    /// The streams used for evaluation.
    pub fn evaluation(seed: u64) -> Self {
        Self::streams(seed, 3u64 << 40)
    }

    fn streams(seed: u64, stream: u64) -> Self {
        let make = |s: u64| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(s);
            rng
        };
        Self {
            latent: make(stream),
            noise: make(stream + 1),
        }
    }
}

/// The parameters, optimizer state and estimator state of a model, as bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelState {
    /// The module record (burnpack).
    pub parameters: Vec<u8>,
    /// The optimizer record (burnpack).
    pub optimizer: Vec<u8>,
    /// The estimator's state.
    pub estimator: EstimatorState,
}

/// Metrics by name.
pub type Metrics = BTreeMap<String, f64>;

/// A task's model with its optimizer and estimator.
pub trait TaskModel: Send {
    /// The stages and their schedules.
    fn plan(&self) -> Vec<StagePlan>;

    /// One optimizer step: step `index` of `epoch` of `stage`.
    fn train_step(
        &mut self,
        stage: Stage,
        index: usize,
        rng: &mut EpochRng,
    ) -> Result<StepOutcome, TrainError>;

    /// Evaluates on the test split (or its first `test_limit` examples).
    fn evaluate(&mut self, rng: &mut EpochRng) -> Result<Metrics, TrainError>;

    /// Informs the model of the main-stage optimizer steps taken so far.
    fn set_global_step(&mut self, step: u64);

    /// The state a checkpoint carries.
    fn state(&self) -> Result<ModelState, TrainError>;

    /// Restores a checkpointed state.
    fn restore(&mut self, state: ModelState) -> Result<(), TrainError>;

    /// Starts from another trial's parameters (`ModelState::parameters`): every parameter
    /// both models have is copied, the others keep their initialization, and the optimizer
    /// starts afresh. This is how the paper warm-starts (reference §7.4).
    fn warm_start(&mut self, parameters: &[u8]) -> Result<(), TrainError>;
}

/// Builds the model `spec` names on `device`, reading its data from `data`; the signalling
/// game reads its images from `game_features` when given (see
/// [`signal_game::SignalGame::from_features`]).
pub fn build(
    spec: &TrialSpec,
    data: &DataDir,
    game_features: Option<&Path>,
    device: &Device,
) -> Result<Box<dyn TaskModel>, TrainError> {
    spec.validate()?;
    Ok(match (spec.task, game_features) {
        (Task::SignalGame, Some(dir)) => {
            Box::new(signal_game::SignalGame::from_features(spec, dir, device)?)
        }
        (Task::Ssvae, _) => Box::new(ssvae::Ssvae::new(spec, data, device)?),
        (Task::SignalGame, None) => Box::new(signal_game::SignalGame::new(spec, data, device)?),
        (Task::Bitvec, _) => Box::new(bitvec::Bitvec::new(spec, data, device)?),
    })
}

/// Rows of `images` (flat `[N, 784]` bytes) at `indices`, scaled by `1/255`, as `[n, 784]`.
pub(crate) fn float_rows(
    images: &[u8],
    width: usize,
    indices: &[usize],
    device: &Device,
) -> Tensor<2> {
    let mut rows = Vec::with_capacity(indices.len() * width);
    for &i in indices {
        rows.extend(
            images[i * width..(i + 1) * width]
                .iter()
                .map(|&p| f32::from(p) / 255.0),
        );
    }
    Tensor::from_data(TensorData::new(rows, [indices.len(), width]), device)
}

/// The steps needed to see `n` examples in batches of `batch` (the last may be short).
pub(crate) fn batches(n: usize, batch: usize) -> usize {
    n.div_ceil(batch)
}

/// The `index`-th batch of `order`.
pub(crate) fn batch_of(order: &[usize], batch: usize, index: usize) -> &[usize] {
    let start = (index * batch).min(order.len());
    &order[start..(start + batch).min(order.len())]
}

/// Reads a one-element tensor.
pub(crate) fn read_scalar(t: Tensor<1>) -> Result<f64, TrainError> {
    Ok(crate::estimators::scalar(t)?)
}
