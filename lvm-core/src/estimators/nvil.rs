//! NVIL for a categorical latent (reference §3.3): the score function with a learned,
//! input-dependent baseline `b_ψ(x)` whose network is trained by regression on the loss. The
//! task owns the baseline network and passes its outputs; this step adds both terms.
//!
//! ```text
//! z_b ~ q_b = softmax(s_b)
//! L = mean_b [ (ℓ_b - b_ψ(x_b))_det log q_b(z_b) + ℓ_b + (ℓ_b,det - b_ψ(x_b))² ]
//!     - λ mean H(q)
//! ```

use burn::tensor::Tensor;
use burn::tensor::activation::{log_softmax, softmax};
use rand::Rng;

use super::score_function::sample;
use super::{Decoder, Step, one_hot, pick, scalar};
use crate::error::MappingError;
use crate::mappings::{self, autodiff::read_f32};

/// One NVIL step; `baseline` holds `b_ψ(x_b)` per example, differentiable in `ψ`.
///
/// # Shapes
/// `scores`: `[B, K]`, `baseline`: `[B]`.
pub fn nvil_step(
    scores: Tensor<2>,
    baseline: Tensor<1>,
    entropy_coeff: f64,
    decoder: &mut Decoder<'_>,
    rng: &mut impl Rng,
) -> Result<Step, MappingError> {
    let [batch, k] = scores.dims();
    let probs = softmax(scores.clone(), 1);
    let classes: Vec<usize> = read_f32(&probs)?
        .chunks(k)
        .map(|row| sample(row, rng))
        .collect();
    let examples: Vec<usize> = (0..batch).collect();
    let loss = decoder(&examples, one_hot(&classes, k, &scores));
    let pairs: Vec<(usize, usize)> = classes.iter().copied().enumerate().collect();
    let log_q = pick(log_softmax(scores, 1), &pairs);
    let entropy = mappings::entropy(probs).mean();
    learned_baseline_step(loss, log_q, baseline, entropy.mul_scalar(entropy_coeff))
}

/// The NVIL surrogate from per-example losses `ℓ`, log-probabilities of the samples, baseline
/// outputs and the already weighted entropy bonus; shared by the categorical and bit-vector
/// forms.
pub(crate) fn learned_baseline_step(
    loss: Tensor<1>,
    log_q: Tensor<1>,
    baseline: Tensor<1>,
    weighted_entropy: Tensor<1>,
) -> Result<Step, MappingError> {
    let batch = loss.dims()[0];
    let loss_mean = scalar(loss.clone().mean())?;

    // (ℓ - b)_det log q + ℓ + (ℓ_det - b)².
    let score = loss
        .clone()
        .detach()
        .sub(baseline.clone().detach())
        .mul(log_q);
    let regression = loss.clone().detach().sub(baseline).powf_scalar(2.0);
    let surrogate = score.add(loss).add(regression).mean().sub(weighted_entropy);
    Ok(Step {
        surrogate,
        loss: loss_mean,
        decoder_calls: batch,
        weights: vec![1.0; batch],
    })
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::estimators::toy;

    #[test]
    fn unbiased_for_the_encoder_and_regresses_the_baseline() {
        // Encoder: the exact gradient of E_q[θ_z] within five Monte Carlo standard errors.
        // Baseline: ∂/∂b of (ℓ - b)² averaged over z is 2 (b - E_q[θ]) (by hand).
        let s = [0.4f32, -0.2, 0.9, 0.0];
        let theta = [1.0f32, -2.0, 0.5, 3.0];
        let (exact, q) = toy::softmax_expectation_gradient(&s, &theta);
        let mean_theta: f64 = q.iter().zip(theta).map(|(q, t)| q * f64::from(t)).sum();
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let (mut grad_s, mut grad_b) = (toy::MonteCarlo::new(4), toy::MonteCarlo::new(1));
        for _ in 0..3000 {
            let scores = toy::param(&s);
            let th = toy::param(&theta);
            let b = Tensor::<1>::from_floats([0.25], &toy::device()).require_grad();
            let mut decoder = toy::decoder(&th);
            let step = nvil_step(scores.clone(), b.clone(), 0.0, &mut *decoder, &mut rng).unwrap();
            assert_eq!(step.decoder_calls, 1);
            let grads = step.surrogate.backward();
            grad_s.add(&toy::values(&scores.grad(&grads).unwrap()));
            grad_b.add(&toy::values(&b.grad(&grads).unwrap()));
        }
        grad_s.assert_matches(&exact, "ds");
        grad_b.assert_matches(&[2.0 * (0.25 - mean_theta)], "db");
    }
}
