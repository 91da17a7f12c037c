//! Sum&Sample (Liu et al. 2019; reference §3.5): the `k` most probable classes are summed
//! exactly, and one class sampled from the rest stands for the remaining mass, each with a
//! score-function term and a running-average baseline.
//!
//! ```text
//! q̄ = detach(softmax(s)),  C = top-k(q̄),  w = Σ_{c∉C} q̄_c,  z ~ q̄ restricted to C^c
//! L = mean_b [ Σ_{c∈C} q̄_c ((ℓ_c - β)_det log q_c + ℓ_c)
//!              + w ((ℓ_z - β)_det log q_z + ℓ_z) ]
//!     - λ mean_b H(q)
//! ```
//!
//! Deviations from the original: the sampled term subtracts the same baseline as the summed
//! ones (the original subtracted 0 there by a missing `elif`, O3, which biases the estimator);
//! the baseline is updated once per step with the batch-mean loss under `q̄`; the extra
//! no-grad decoder call on the argmax for logging (O14) is not made.

use burn::tensor::Tensor;
use burn::tensor::activation::{log_softmax, softmax};
use rand::Rng;

use super::score_function::Baseline;
use super::{Decoder, Step, one_hot, pick, scalar};
use crate::error::MappingError;
use crate::mappings::{self, autodiff::read_f32};

/// Sum&Sample with `k` summed classes and its running-average baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct SumAndSample {
    /// Classes summed exactly per example.
    pub k: usize,
    /// The running-average baseline.
    pub baseline: Baseline,
    /// Whether steps update the baseline (true in training, false in evaluation).
    pub training: bool,
}

impl SumAndSample {
    /// Sum&Sample summing the `k` most probable classes.
    pub fn new(k: usize) -> Self {
        Self {
            k,
            baseline: Baseline::RunningAverage {
                mean: 0.0,
                steps: 0,
            },
            training: true,
        }
    }

    /// One training step.
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
        let [batch, classes] = scores.dims();
        let probs = softmax(scores.clone(), 1);
        let q = read_f32(&probs)?;
        let k = self.k.min(classes);

        // Per example: the k summed classes with weight q̄_c, then one sampled class with
        // weight w (only when classes remain).
        let (mut pairs, mut weights) = (Vec::new(), Vec::new());
        for (b, row) in q.chunks(classes).enumerate() {
            let mut order: Vec<usize> = (0..classes).collect();
            order.sort_by(|&x, &y| row[y].total_cmp(&row[x]).then(x.cmp(&y)));
            for &c in &order[..k] {
                pairs.push((b, c));
                weights.push(row[c]);
            }
            let rest = &order[k..];
            let mass: f32 = rest.iter().map(|&c| row[c]).sum();
            if let Some(c) = sample_among(row, rest, mass, rng) {
                pairs.push((b, c));
                weights.push(mass);
            }
        }
        let examples: Vec<usize> = pairs.iter().map(|p| p.0).collect();
        let chosen: Vec<usize> = pairs.iter().map(|p| p.1).collect();
        let losses = decoder(&examples, one_hot(&chosen, classes, &scores));

        // Σ w ((ℓ - β)_det log q + ℓ) per pair, summed, over the batch.
        let n = pairs.len();
        let w = Tensor::<1>::from_data(
            burn::tensor::TensorData::new(weights.clone(), [n]),
            &scores.device(),
        );
        let loss = scalar(losses.clone().mul(w.clone()).sum())? / batch as f64;
        let advantage = self.baseline.advantage(&losses, n, loss, self.training);
        let log_q = pick(log_softmax(scores, 1), &pairs);
        let terms = advantage.mul(log_q).add(losses).mul(w);
        let entropy = mappings::entropy(probs).mean();
        let surrogate = terms
            .sum()
            .div_scalar(batch as f64)
            .sub(entropy.mul_scalar(entropy_coeff));
        Ok(Step {
            surrogate,
            loss,
            decoder_calls: n,
            weights,
        })
    }
}

/// A class drawn from `row` restricted to `rest` (total mass `mass`); `None` when `rest` is
/// empty or carries no mass.
fn sample_among(row: &[f32], rest: &[usize], mass: f32, rng: &mut impl Rng) -> Option<usize> {
    if rest.is_empty() || mass <= 0.0 {
        return None;
    }
    let u = rng.random::<f64>() * f64::from(mass);
    let mut cumulative = 0.0;
    for &c in rest {
        cumulative += f64::from(row[c]);
        if u < cumulative {
            return Some(c);
        }
    }
    rest.iter().rev().copied().find(|&c| row[c] > 0.0)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::estimators::toy;

    #[test]
    fn is_unbiased_and_calls_the_decoder_k_plus_one_times() {
        // The mean gradient matches the exact one within five Monte Carlo standard errors.
        let s = [0.4f32, -0.2, 0.9, 0.0];
        let theta = [1.0f32, -2.0, 0.5, 3.0];
        let (exact, _) = toy::softmax_expectation_gradient(&s, &theta);
        let mut estimator = SumAndSample::new(1);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut grad = toy::MonteCarlo::new(4);
        for _ in 0..3000 {
            let scores = toy::param(&s);
            let th = toy::param(&theta);
            let step = estimator
                .step(scores.clone(), 0.0, &mut *toy::decoder(&th), &mut rng)
                .unwrap();
            assert_eq!(step.decoder_calls, 2);
            grad.add(&toy::values(
                &scores.grad(&step.surrogate.backward()).unwrap(),
            ));
        }
        grad.assert_matches(&exact, "ds");
    }

    #[test]
    fn summing_every_class_is_exact_marginalization() {
        // k = K: no sample, the loss is Σ_c q_c θ_c exactly (computed by hand below).
        let s = [0.3f32, -0.1];
        let theta = [2.0f32, -1.0];
        let th = toy::param(&theta);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let step = SumAndSample::new(2)
            .step(toy::param(&s), 0.0, &mut *toy::decoder(&th), &mut rng)
            .unwrap();
        let q0 = 1.0 / (1.0 + (-0.4f64).exp());
        assert!((step.loss - (2.0 * q0 - (1.0 - q0))).abs() < 1e-6);
        assert_eq!(step.decoder_calls, 2);
    }
}
