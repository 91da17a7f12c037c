//! [`LatentEstimator`]: the one interface a task trains through, whatever the estimator. A
//! task hands it the encoder's scores (and, for NVIL, its baseline network's outputs) and a
//! decoder; it returns a [`Step`] with the surrogate, the loss under the estimator's
//! evaluation semantics (reference §3.7) and the decoder calls it made. [`for_spec`] builds
//! the estimator a [`TrialSpec`] names, for a categorical latent or a bit vector.
//!
//! The state that must survive a checkpoint (the running-average baseline and the step that
//! sets the Gumbel temperature) is exposed as [`EstimatorState`], so a resumed trial
//! continues exactly; the original loses both on reload (reference §11, O2 and O4).

use burn::tensor::Tensor;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::bits::{self, BernoulliScoreFunction, SparseBits};
use super::gumbel::{self, argmax};
use super::marginal::{self, Normalizer};
use super::nvil;
use super::score_function::{Baseline, ScoreFunction};
use super::sum_and_sample::SumAndSample;
use super::{Decoder, Step, one_hot, scalar};
use crate::error::MappingError;
use crate::mappings::{Init, SparseMapOptions, autodiff::read_f32};
use crate::spec::{Estimator, Task, Temperature, TrialSpec};

/// The part of an estimator's state that a checkpoint carries.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct EstimatorState {
    /// The running-average baseline `b` (0 when the estimator has none).
    pub baseline_mean: f64,
    /// Training steps averaged into `b`.
    pub baseline_steps: u64,
    /// Optimizer steps taken, which set the Gumbel temperature.
    pub global_step: u64,
}

/// A gradient estimator or marginalization, with its state.
pub trait LatentEstimator: Send {
    /// Which estimator this is.
    fn estimator(&self) -> Estimator;

    /// Whether [`LatentEstimator::step`] needs the outputs of a learned baseline network.
    fn needs_baseline(&self) -> bool {
        self.estimator() == Estimator::Nvil
    }

    /// One step on a batch: `scores` are `[B, K]` class scores or `[B, D]` bit scores,
    /// `baseline` the `[B]` outputs of the task's baseline network (NVIL only).
    fn step(
        &mut self,
        scores: Tensor<2>,
        baseline: Option<Tensor<1>>,
        decoder: &mut Decoder<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Result<Step, MappingError>;

    /// Training mode (the default) updates baselines and uses training semantics; evaluation
    /// mode uses the estimator's evaluation semantics (reference §3.7).
    fn set_training(&mut self, training: bool);

    /// Records that `step` optimizer steps have been taken (sets the Gumbel temperature).
    fn set_global_step(&mut self, step: u64);

    /// The running-average baseline `b` about to be used, if the estimator has one.
    fn running_baseline(&self) -> Option<f64>;

    /// The state a checkpoint carries.
    fn state(&self) -> EstimatorState;

    /// Restores a checkpointed state.
    fn restore(&mut self, state: &EstimatorState);
}

/// The estimator `spec` names, for its task's latent.
///
/// # Panics
/// If the spec has not been validated (an estimator its task does not support).
pub fn for_spec(spec: &TrialSpec) -> Box<dyn LatentEstimator> {
    let h = &spec.hyper;
    let temperature = h.temperature.unwrap_or(Temperature {
        decay: 0.0,
        update_every: 1,
        min_tau: 1.0,
    });
    let common = Common {
        estimator: spec.estimator,
        entropy_coeff: h.entropy_coeff,
        temperature,
        global_step: 0,
        training: true,
    };
    use Estimator::*;
    if spec.task == Task::Bitvec {
        let method = match spec.estimator {
            Sfe | SfePlus | Nvil | Gumbel | StGumbel => {
                BitMethod::Sampled(BernoulliScoreFunction {
                    baseline: baseline_for(spec.estimator),
                    training: true,
                })
            }
            TopkSparsemax => BitMethod::Sparse(SparseBits::TopK {
                k: h.k.unwrap_or(10),
            }),
            Sparsemap | SparsemapBudget => {
                BitMethod::Sparse(SparseBits::SparseMap(SparseMapOptions {
                    budget: h.budget.filter(|_| spec.estimator == SparsemapBudget),
                    ..SparseMapOptions::default()
                }))
            }
            other => panic!("{other} is not a bit-vector estimator"),
        };
        Box::new(BitVector { common, method })
    } else {
        let method = match spec.estimator {
            Sfe | SfePlus => CategoricalMethod::Score(ScoreFunction {
                baseline: baseline_for(spec.estimator),
                training: true,
            }),
            SumAndSample => CategoricalMethod::SumAndSample(
                super::sum_and_sample::SumAndSample::new(h.k.unwrap_or(1)),
            ),
            Softmax => CategoricalMethod::Marginal(Normalizer::Softmax),
            Sparsemax => CategoricalMethod::Marginal(Normalizer::Sparsemax),
            Nvil | Gumbel | StGumbel => CategoricalMethod::Other,
            other => panic!("{other} is not a categorical estimator"),
        };
        Box::new(Categorical { common, method })
    }
}

fn baseline_for(estimator: Estimator) -> Baseline {
    if estimator == Estimator::SfePlus {
        Baseline::Sample
    } else {
        Baseline::RunningAverage {
            mean: 0.0,
            steps: 0,
        }
    }
}

/// What every estimator carries besides its method.
#[derive(Debug, Clone)]
struct Common {
    estimator: Estimator,
    entropy_coeff: f64,
    temperature: Temperature,
    global_step: u64,
    training: bool,
}

impl Common {
    fn tau(&self) -> f64 {
        let t = &self.temperature;
        gumbel::temperature(self.global_step, t.decay, t.update_every, t.min_tau)
    }
}

fn running_state(baseline: &Baseline, global_step: u64) -> EstimatorState {
    match *baseline {
        Baseline::RunningAverage { mean, steps } => EstimatorState {
            baseline_mean: mean,
            baseline_steps: steps,
            global_step,
        },
        Baseline::Sample => EstimatorState {
            global_step,
            ..EstimatorState::default()
        },
    }
}

fn restore_running(baseline: &mut Baseline, state: &EstimatorState) {
    if let Baseline::RunningAverage { mean, steps } = baseline {
        *mean = state.baseline_mean;
        *steps = state.baseline_steps;
    }
}

fn running_mean(baseline: &Baseline) -> Option<f64> {
    match *baseline {
        Baseline::RunningAverage { mean, .. } => Some(mean),
        Baseline::Sample => None,
    }
}

fn require_baseline(baseline: Option<Tensor<1>>) -> Result<Tensor<1>, MappingError> {
    baseline.ok_or(MappingError::MissingBaseline)
}

#[derive(Debug, Clone)]
enum CategoricalMethod {
    Score(ScoreFunction),
    SumAndSample(SumAndSample),
    Marginal(Normalizer),
    /// NVIL and the Gumbel estimators: stateless beyond `Common`.
    Other,
}

/// Every estimator of a categorical latent.
#[derive(Debug, Clone)]
struct Categorical {
    common: Common,
    method: CategoricalMethod,
}

impl LatentEstimator for Categorical {
    fn estimator(&self) -> Estimator {
        self.common.estimator
    }

    fn step(
        &mut self,
        scores: Tensor<2>,
        baseline: Option<Tensor<1>>,
        decoder: &mut Decoder<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Result<Step, MappingError> {
        let (lambda, tau) = (self.common.entropy_coeff, self.common.tau());
        match &mut self.method {
            CategoricalMethod::Score(sf) => sf.step(scores, lambda, decoder, rng),
            CategoricalMethod::SumAndSample(_) if !self.common.training => {
                argmax_step(scores, decoder)
            }
            CategoricalMethod::SumAndSample(ss) => ss.step(scores, lambda, decoder, rng),
            CategoricalMethod::Marginal(n) => marginal::marginalize(*n, scores, lambda, decoder),
            CategoricalMethod::Other => match self.common.estimator {
                Estimator::Nvil => {
                    let b = require_baseline(baseline)?;
                    nvil::nvil_step(scores, b, lambda, decoder, rng)
                }
                e => {
                    gumbel::gumbel_step(scores, tau, e == Estimator::StGumbel, lambda, decoder, rng)
                }
            },
        }
    }

    fn set_training(&mut self, training: bool) {
        self.common.training = training;
        match &mut self.method {
            CategoricalMethod::Score(sf) => sf.training = training,
            CategoricalMethod::SumAndSample(ss) => ss.training = training,
            _ => {}
        }
    }

    fn set_global_step(&mut self, step: u64) {
        self.common.global_step = step;
    }

    fn running_baseline(&self) -> Option<f64> {
        match &self.method {
            CategoricalMethod::Score(sf) => running_mean(&sf.baseline),
            CategoricalMethod::SumAndSample(ss) => running_mean(&ss.baseline),
            _ => None,
        }
    }

    fn state(&self) -> EstimatorState {
        let step = self.common.global_step;
        match &self.method {
            CategoricalMethod::Score(sf) => running_state(&sf.baseline, step),
            CategoricalMethod::SumAndSample(ss) => running_state(&ss.baseline, step),
            _ => EstimatorState {
                global_step: step,
                ..EstimatorState::default()
            },
        }
    }

    fn restore(&mut self, state: &EstimatorState) {
        self.common.global_step = state.global_step;
        match &mut self.method {
            CategoricalMethod::Score(sf) => restore_running(&mut sf.baseline, state),
            CategoricalMethod::SumAndSample(ss) => restore_running(&mut ss.baseline, state),
            _ => {}
        }
    }
}

/// Sum&Sample in evaluation (reference §3.5): the loss of the argmax class only.
fn argmax_step(scores: Tensor<2>, decoder: &mut Decoder<'_>) -> Result<Step, MappingError> {
    let [batch, k] = scores.dims();
    let classes: Vec<usize> = read_f32(&scores)?.chunks(k).map(argmax).collect();
    let examples: Vec<usize> = (0..batch).collect();
    let losses = decoder(&examples, one_hot(&classes, k, &scores));
    let surrogate = losses.mean();
    Ok(Step {
        loss: scalar(surrogate.clone())?,
        surrogate,
        decoder_calls: batch,
        weights: vec![1.0; batch],
    })
}

#[derive(Debug, Clone)]
enum BitMethod {
    /// SFE, SFE+ (this baseline), NVIL and the Gumbel estimators.
    Sampled(BernoulliScoreFunction),
    Sparse(SparseBits),
}

/// Every estimator of a bit-vector latent.
#[derive(Debug, Clone)]
struct BitVector {
    common: Common,
    method: BitMethod,
}

impl LatentEstimator for BitVector {
    fn estimator(&self) -> Estimator {
        self.common.estimator
    }

    fn step(
        &mut self,
        scores: Tensor<2>,
        baseline: Option<Tensor<1>>,
        decoder: &mut Decoder<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Result<Step, MappingError> {
        let (lambda, tau) = (self.common.entropy_coeff, self.common.tau());
        match &mut self.method {
            BitMethod::Sparse(SparseBits::SparseMap(options)) => {
                // A fresh random initial vertex per step, drawn from the trial's stream.
                let mut options = options.clone();
                options.init = Init::Random { seed: rng.random() };
                bits::marginalize_bits(&SparseBits::SparseMap(options), scores, lambda, decoder)
            }
            BitMethod::Sparse(kind) => bits::marginalize_bits(kind, scores, lambda, decoder),
            BitMethod::Sampled(sf) => match self.common.estimator {
                Estimator::Nvil => {
                    let b = require_baseline(baseline)?;
                    bits::bernoulli_nvil_step(scores, b, lambda, decoder, rng)
                }
                e @ (Estimator::Gumbel | Estimator::StGumbel) => {
                    let st = e == Estimator::StGumbel;
                    bits::bernoulli_gumbel_step(scores, tau, st, lambda, decoder, rng)
                }
                _ => sf.step(scores, lambda, decoder, rng),
            },
        }
    }

    fn set_training(&mut self, training: bool) {
        self.common.training = training;
        if let BitMethod::Sampled(sf) = &mut self.method {
            sf.training = training;
        }
    }

    fn set_global_step(&mut self, step: u64) {
        self.common.global_step = step;
    }

    fn running_baseline(&self) -> Option<f64> {
        match &self.method {
            BitMethod::Sampled(sf) if self.common.estimator == Estimator::Sfe => {
                running_mean(&sf.baseline)
            }
            _ => None,
        }
    }

    fn state(&self) -> EstimatorState {
        match &self.method {
            BitMethod::Sampled(sf) => running_state(&sf.baseline, self.common.global_step),
            BitMethod::Sparse(_) => EstimatorState {
                global_step: self.common.global_step,
                ..EstimatorState::default()
            },
        }
    }

    fn restore(&mut self, state: &EstimatorState) {
        self.common.global_step = state.global_step;
        if let BitMethod::Sampled(sf) = &mut self.method {
            restore_running(&mut sf.baseline, state);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::estimators::toy;

    #[test]
    fn every_supported_pair_builds_and_counts_its_decoder_calls() {
        // One example, K = 4, θ known: the decoder calls of each categorical estimator are
        // their definition (reference §3.9): 1, 2 (SFE+), K (softmax), the sparsemax support
        // (2 here: sparsemax([2, 1.5, -1, -2]) = [0.75, 0.25, 0, 0]), k + 1 for Sum&Sample.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let s = [2.0f32, 1.5, -1.0, -2.0];
        let theta = toy::param(&[1.0, 2.0, 3.0, 4.0]);
        for &estimator in Task::Ssvae.estimators() {
            let spec = TrialSpec::paper(Task::Ssvae, estimator, 1);
            let mut method = for_spec(&spec);
            assert_eq!(method.estimator(), estimator);
            let b = Tensor::<1>::from_floats([0.0], &toy::device());
            let baseline = method.needs_baseline().then_some(b);
            let mut decoder = toy::decoder(&theta);
            let step = method
                .step(toy::param(&s), baseline, &mut *decoder, &mut rng)
                .unwrap();
            let want = match estimator {
                Estimator::SfePlus | Estimator::SumAndSample => 2,
                Estimator::Softmax => 4,
                Estimator::Sparsemax => 2,
                _ => 1,
            };
            assert_eq!(step.decoder_calls, want, "{estimator}");
            assert_eq!(step.weights.len(), want, "{estimator}");
        }
    }

    #[test]
    fn state_round_trips_and_sets_the_temperature() {
        let spec = TrialSpec::paper(Task::Ssvae, Estimator::Sfe, 1);
        let mut method = for_spec(&spec);
        let state = EstimatorState {
            baseline_mean: 2.5,
            baseline_steps: 7,
            global_step: 1234,
        };
        method.restore(&state);
        assert_eq!(method.state(), state);
        assert_eq!(method.running_baseline(), Some(2.5));

        // SSVAE Gumbel: decay 1e-4 every 1000 steps, so at step 1234 τ = exp(-0.1) (§7.5).
        let spec = TrialSpec::paper(Task::Ssvae, Estimator::Gumbel, 1);
        let mut gumbel = Categorical {
            common: Common {
                estimator: Estimator::Gumbel,
                entropy_coeff: 1.0,
                temperature: spec.hyper.temperature.unwrap(),
                global_step: 0,
                training: true,
            },
            method: CategoricalMethod::Other,
        };
        gumbel.set_global_step(1234);
        assert!((gumbel.common.tau() - (-0.1f64).exp()).abs() < 1e-12);
    }
}
