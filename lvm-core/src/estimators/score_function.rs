//! Score-function estimators for a categorical latent (reference §3.1, §3.2): SFE with a
//! running-average baseline and SFE+ with a second, independent sample as baseline.
//!
//! ```text
//! z_b ~ q_b = softmax(s_b)
//! L = mean_b [ (ℓ_b - β_b)_det log q_b(z_b) + ℓ_b ] - λ mean_b H(q_b)
//! ```
//!
//! Deviation from the original (O1): the SFE+ baseline `β = ℓ(z')` is detached, so the
//! decoder is not trained on the baseline sample with weight `-log q(z)`.

use burn::tensor::Tensor;
use burn::tensor::activation::{log_softmax, softmax};
use rand::Rng;

use super::{Decoder, Step, one_hot, pick, scalar};
use crate::error::MappingError;
use crate::mappings::{self, autodiff::read_f32};

/// The baseline subtracted from the loss in the score term.
#[derive(Debug, Clone, PartialEq)]
pub enum Baseline {
    /// The cumulative mean of the batch-mean loss over all previous training steps
    /// (`b_t = b_{t-1} + (ℓ̄_t - b_{t-1}) / t`, `b_0 = 0`), updated after it is used.
    RunningAverage {
        /// Current value `b`.
        mean: f64,
        /// Steps averaged so far `t`.
        steps: u64,
    },
    /// The loss of a second sample `z' ~ q`, decoded in the same call as `z`.
    Sample,
}

impl Baseline {
    /// `(ℓ - β)_det` for the first `batch` of `losses`. For [`Baseline::Sample`] the next
    /// `batch` losses are those of the baseline samples; a running average is updated with
    /// `loss_mean` afterwards when `training`.
    pub(crate) fn advantage(
        &mut self,
        losses: &Tensor<1>,
        batch: usize,
        loss_mean: f64,
        training: bool,
    ) -> Tensor<1> {
        let loss = losses.clone().narrow(0, 0, batch).detach();
        match self {
            Baseline::RunningAverage { mean, steps } => {
                let advantage = loss.sub_scalar(*mean);
                if training {
                    *steps += 1;
                    *mean += (loss_mean - *mean) / *steps as f64;
                }
                advantage
            }
            Baseline::Sample => loss.sub(losses.clone().narrow(0, batch, batch).detach()),
        }
    }
}

/// SFE (running-average baseline) or SFE+ (sample baseline).
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreFunction {
    /// The baseline and its state.
    pub baseline: Baseline,
    /// Whether steps update the running average (true in training, false in evaluation).
    pub training: bool,
}

impl ScoreFunction {
    /// SFE: running-average baseline starting at 0.
    pub fn sfe() -> Self {
        Self {
            baseline: Baseline::RunningAverage {
                mean: 0.0,
                steps: 0,
            },
            training: true,
        }
    }

    /// SFE+: a second sample as baseline.
    pub fn sfe_plus() -> Self {
        Self {
            baseline: Baseline::Sample,
            training: true,
        }
    }

    /// One training step; `rng` draws the samples.
    ///
    /// # Shapes
    /// `scores`: `[B, K]`.
    pub fn step(
        &mut self,
        scores: Tensor<2>,
        entropy_coeff: f64,
        decoder: &mut Decoder<'_>,
        rng: &mut impl Rng,
    ) -> Result<Step, MappingError> {
        let [batch, k] = scores.dims();
        let probs = softmax(scores.clone(), 1);
        let q = read_f32(&probs)?;

        // z ~ q (and z' ~ q for SFE+), decoded in one call.
        let mut classes: Vec<usize> = q.chunks(k).map(|row| sample(row, rng)).collect();
        let mut examples: Vec<usize> = (0..batch).collect();
        if self.baseline == Baseline::Sample {
            classes.extend(q.chunks(k).map(|row| sample(row, rng)));
            examples.extend(0..batch);
        }
        let losses = decoder(&examples, one_hot(&classes, k, &scores));
        let loss = losses.clone().narrow(0, 0, batch);

        // β: the running average (a constant) or the detached loss of z'.
        let loss_mean = scalar(loss.clone().mean())?;
        let advantage = self
            .baseline
            .advantage(&losses, batch, loss_mean, self.training);

        // L = mean[(ℓ - β)_det log q(z) + ℓ] - λ mean H(q).
        let pairs: Vec<(usize, usize)> = (0..batch).map(|b| (b, classes[b])).collect();
        let log_q = pick(log_softmax(scores, 1), &pairs);
        let entropy = mappings::entropy(probs).mean();
        let surrogate = advantage
            .mul(log_q)
            .add(loss)
            .mean()
            .sub(entropy.mul_scalar(entropy_coeff));
        Ok(Step {
            surrogate,
            loss: loss_mean,
            decoder_calls: examples.len(),
            weights: (0..examples.len())
                .map(|i| f32::from(u8::from(i < batch)))
                .collect(),
        })
    }
}

/// One draw from a categorical distribution given by `probs` (inverse CDF).
pub(crate) fn sample(probs: &[f32], rng: &mut impl Rng) -> usize {
    let u: f64 = rng.random();
    let mut cumulative = 0.0;
    for (c, &p) in probs.iter().enumerate() {
        cumulative += f64::from(p);
        if u < cumulative {
            return c;
        }
    }
    // Rounding left u above the total: the last class with mass.
    probs
        .iter()
        .rposition(|&p| p > 0.0)
        .unwrap_or(probs.len() - 1)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::estimators::toy;

    /// Over many steps the mean SFE gradient matches the exact gradient of `E_q[θ_z]`, within
    /// five Monte Carlo standard errors.
    fn check_unbiased(mut estimator: ScoreFunction, calls_per_example: usize) {
        let s = [0.4f32, -0.2, 0.9, 0.0];
        let theta = [1.0f32, -2.0, 0.5, 3.0];
        let (exact_s, q) = toy::softmax_expectation_gradient(&s, &theta);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (mut grad_s, mut grad_theta) = (toy::MonteCarlo::new(4), toy::MonteCarlo::new(4));
        for _ in 0..3000 {
            let scores = toy::param(&s);
            let th = toy::param(&theta);
            let step = estimator
                .step(scores.clone(), 0.0, &mut *toy::decoder(&th), &mut rng)
                .unwrap();
            assert_eq!(step.decoder_calls, calls_per_example);
            let grads = step.surrogate.backward();
            grad_s.add(&toy::values(&scores.grad(&grads).unwrap()));
            grad_theta.add(&toy::values(&th.grad(&grads).unwrap()));
        }
        grad_s.assert_matches(&exact_s, "ds");
        // ∂/∂θ_c of the pathwise term is 1[z = c], whose mean is q_c.
        grad_theta.assert_matches(&q, "dθ");
    }

    #[test]
    fn sfe_is_unbiased_and_calls_the_decoder_once() {
        check_unbiased(ScoreFunction::sfe(), 1);
    }

    #[test]
    fn sfe_plus_is_unbiased_and_calls_the_decoder_twice() {
        check_unbiased(ScoreFunction::sfe_plus(), 2);
    }

    #[test]
    fn running_average_is_the_cumulative_mean_updated_after_use() {
        // Reference §3.1: b_0 = 0, b_t = b_{t-1} + (ℓ̄_t - b_{t-1}) / t. With ℓ ≡ θ_z and
        // every θ equal to 2, ℓ̄ = 2 at each step, so b goes 0 → 2 → 2.
        let mut estimator = ScoreFunction::sfe();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let th = toy::param(&[2.0, 2.0]);
        // The third step evaluates: reference §3.1 updates the average in training only.
        for (steps, training) in [(1, true), (2, true), (2, false)] {
            estimator.training = training;
            let scores = toy::param(&[0.1, 0.2]);
            estimator
                .step(scores, 0.0, &mut *toy::decoder(&th), &mut rng)
                .unwrap();
            assert_eq!(
                estimator.baseline,
                Baseline::RunningAverage { mean: 2.0, steps }
            );
        }
    }
}
