//! Gumbel-Softmax and straight-through Gumbel for a categorical latent (reference §3.4):
//! the decoder receives the relaxed sample `y = softmax((s + g) / τ)`, or for the
//! straight-through variant the one-hot of its argmax with the gradient of `y`.
//!
//! ```text
//! g_j = -log(-log u_j),  u_j ~ U(ε, 1 - ε),   y = softmax((s + g) / τ)
//! L = mean_b ℓ(x_b, y_b) - λ mean_b H(softmax(s_b))
//! ```

use burn::tensor::activation::softmax;
use burn::tensor::{Tensor, TensorData};
use rand::Rng;

use super::{Decoder, Step, one_hot, scalar};
use crate::error::MappingError;
use crate::mappings::{self, autodiff::read_f32};

/// Gumbel noise for a `[rows, k]` matrix, `u` clamped to `[ε, 1 - ε]` (ε = f32 epsilon, as
/// torch's `RelaxedOneHotCategorical`).
pub fn gumbel_noise(rows: usize, k: usize, rng: &mut impl Rng) -> Vec<f32> {
    let eps = f64::from(f32::EPSILON);
    (0..rows * k)
        .map(|_| {
            let u = rng.random::<f64>().clamp(eps, 1.0 - eps);
            (-(-u.ln()).ln()) as f32
        })
        .collect()
}

/// One Gumbel-Softmax step at temperature `tau`; `straight_through` feeds the one-hot argmax
/// forward and the relaxed sample's gradient backward.
///
/// # Shapes
/// `scores`: `[B, K]`.
pub fn gumbel_step(
    scores: Tensor<2>,
    tau: f64,
    straight_through: bool,
    entropy_coeff: f64,
    decoder: &mut Decoder<'_>,
    rng: &mut impl Rng,
) -> Result<Step, MappingError> {
    let [batch, k] = scores.dims();
    let noise = Tensor::<2>::from_data(
        TensorData::new(gumbel_noise(batch, k, rng), [batch, k]),
        &scores.device(),
    );

    // y = softmax((s + g) / τ); straight-through: one_hot(argmax y) + (y - detach(y)).
    let relaxed = softmax(scores.clone().add(noise).div_scalar(tau), 1);
    let latent = if straight_through {
        let y = read_f32(&relaxed)?;
        let hard: Vec<usize> = y.chunks(k).map(argmax).collect();
        one_hot(&hard, k, &scores).add(relaxed.clone().sub(relaxed.detach()))
    } else {
        relaxed
    };
    let examples: Vec<usize> = (0..batch).collect();
    let losses = decoder(&examples, latent);

    // L = mean ℓ - λ mean H(softmax(s)).
    let expected = losses.mean();
    let loss = scalar(expected.clone())?;
    let entropy = mappings::entropy(softmax(scores, 1)).mean();
    let surrogate = expected.sub(entropy.mul_scalar(entropy_coeff));
    Ok(Step {
        surrogate,
        loss,
        decoder_calls: batch,
        weights: vec![1.0; batch],
    })
}

/// Index of the largest entry (the first on ties).
pub(crate) fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |best, (i, &v)| if v > row[best] { i } else { best })
}

/// The temperature at optimizer step `step` (0-based; reference §3.4): updated every
/// `update_every` steps to `max(min_tau, exp(-decay · step))`, starting at 1.
pub fn temperature(step: u64, decay: f64, update_every: u64, min_tau: f64) -> f64 {
    let last_update = step - step % update_every.max(1);
    (-decay * last_update as f64).exp().max(min_tau)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::estimators::toy;

    #[test]
    fn argmax_of_the_relaxed_sample_is_distributed_as_softmax() {
        // Gumbel-max: argmax(s + g) ~ softmax(s) exactly, and as τ → 0 the relaxed sample
        // tends to that one-hot. Frequencies over 20000 draws within 5 standard errors.
        let s = [0.5f32, -1.0, 1.5, 0.0];
        let e: Vec<f64> = s.iter().map(|&v| f64::from(v).exp()).collect();
        let q: Vec<f64> = e.iter().map(|v| v / e.iter().sum::<f64>()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let draws = 20_000;
        let mut counts = [0usize; 4];
        let (mut near_one_hot, tau) = (0, 0.01);
        for _ in 0..draws {
            let g = gumbel_noise(1, 4, &mut rng);
            let logits: Vec<f64> = (0..4).map(|j| f64::from(s[j] + g[j]) / tau).collect();
            let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            let y: Vec<f32> = logits
                .iter()
                .map(|l| ((l - max).exp() / total) as f32)
                .collect();
            counts[argmax(&y)] += 1;
            near_one_hot += usize::from(y.iter().any(|&v| v > 0.99));
        }
        for c in 0..4 {
            let freq = counts[c] as f64 / f64::from(draws);
            let stderr = (q[c] * (1.0 - q[c]) / f64::from(draws)).sqrt();
            assert!(
                (freq - q[c]).abs() < 5.0 * stderr,
                "class {c}: {freq} vs {}",
                q[c]
            );
        }
        assert!(near_one_hot as f64 > 0.95 * f64::from(draws));
    }

    #[test]
    fn straight_through_feeds_one_hot_forward_and_relaxed_gradient_back() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let theta = toy::param(&[1.0, -1.0, 0.5]);
        let mut seen = Vec::new();
        let mut decoder = |_: &[usize], latent: Tensor<2>| {
            seen.push(toy::values(&latent));
            latent.matmul(theta.clone().transpose()).reshape([1])
        };
        let scores = toy::param(&[0.2, 0.1, -0.3]);
        let step = gumbel_step(scores.clone(), 0.5, true, 0.0, &mut decoder, &mut rng).unwrap();
        let forward = &seen[0];
        assert_eq!(
            forward.iter().filter(|&&v| v == 1.0).count(),
            1,
            "{forward:?}"
        );
        assert_eq!(
            forward.iter().filter(|&&v| v == 0.0).count(),
            2,
            "{forward:?}"
        );
        let grads = step.surrogate.backward();
        let g = toy::values(&scores.grad(&grads).unwrap());
        assert!(
            g.iter().any(|v| v.abs() > 1e-6),
            "the relaxed path carries a gradient"
        );
        assert_eq!(step.decoder_calls, 1);
    }

    #[test]
    fn temperature_follows_the_reference_schedule() {
        // Reference §7.5: decay 1e-4 every 1000 steps: τ = 1 until step 999, then e^{-0.1},
        // and 0.5 from step 7000 on (e^{-0.7} = 0.4966 < 0.5).
        assert_eq!(temperature(0, 1e-4, 1000, 0.5), 1.0);
        assert_eq!(temperature(999, 1e-4, 1000, 0.5), 1.0);
        assert!((temperature(1000, 1e-4, 1000, 0.5) - (-0.1f64).exp()).abs() < 1e-12);
        assert_eq!(temperature(7000, 1e-4, 1000, 0.5), 0.5);
        // Reference §9.4: decay 1e-5 reaches 0.5 at step 70,000 (e^{-0.69} = 0.5016 before).
        assert!((temperature(69_999, 1e-5, 1000, 0.5) - (-0.69f64).exp()).abs() < 1e-12);
        assert_eq!(temperature(70_000, 1e-5, 1000, 0.5), 0.5);
    }

    #[test]
    fn relaxed_samples_lie_on_the_simplex_and_harden_as_tau_falls() {
        // Through gumbel_step itself: every relaxed row sums to 1, and at τ = 0.01 nearly
        // every row is within 1e-2 of a one-hot vector, while at τ = 10 none is.
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let theta = toy::param(&[1.0, 2.0, 3.0]);
        for (tau, hard_share) in [(0.01, 0.95), (10.0, 0.0)] {
            let mut rows = Vec::new();
            let mut decoder = |_: &[usize], latent: Tensor<2>| {
                rows.extend(toy::values(&latent).chunks(3).map(|r| r.to_vec()));
                let n = latent.dims()[0];
                latent.matmul(theta.clone().transpose()).reshape([n])
            };
            let scores = toy::param(&[0.3, -0.2, 0.1]).repeat_dim(0, 200);
            gumbel_step(scores, tau, false, 0.0, &mut decoder, &mut rng).unwrap();
            assert!(
                rows.iter()
                    .all(|r| (r.iter().sum::<f32>() - 1.0).abs() < 1e-5)
            );
            let hard = rows.iter().filter(|r| r.iter().any(|&v| v > 0.99)).count();
            if hard_share > 0.0 {
                assert!(
                    hard as f64 >= hard_share * 200.0,
                    "τ = {tau}: {hard} hard rows"
                );
            } else {
                assert_eq!(hard, 0, "τ = {tau}");
            }
        }
    }
}
