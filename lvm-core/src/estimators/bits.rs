//! Estimators for a latent of `D` independent bits with scores `s ∈ R^{B×D}` (reference §4):
//! exact sparse marginalization under top-k sparsemax or SparseMAP (with or without a budget),
//! and the Bernoulli score-function and Gumbel estimators.
//!
//! ```text
//! q(z) = Π_i σ(s_i)^{z_i} (1 - σ(s_i))^{1 - z_i},   log q(z) = s·z - Σ_i softplus(s_i)
//! H(q) = Σ_i softplus(s_i) - σ(s_i) s_i
//! ```
//!
//! Deviation from the original (O5): straight-through Gumbel feeds forward the rounded relaxed
//! sample `1[y > ½]`, a real sample, rather than the deterministic mode `1[s > 0]`.

use burn::tensor::activation::{sigmoid, softplus};
use burn::tensor::{Tensor, TensorData};
use rand::Rng;

use super::nvil::learned_baseline_step;
use super::score_function::Baseline;
use super::{Decoder, Step, pick, scalar};
use crate::error::MappingError;
use crate::mappings::{self, SparseMapOptions, autodiff::read_f32};

/// Which sparse distribution over bit vectors is marginalized.
#[derive(Debug, Clone, PartialEq)]
pub enum SparseBits {
    /// Top-k sparsemax over the `k` best vectors.
    TopK {
        /// Vectors scored.
        k: usize,
    },
    /// SparseMAP with these solver settings (budget included).
    SparseMap(SparseMapOptions),
}

/// Exact marginalization over the support of a sparse distribution on bit vectors:
/// `L = (1/B) Σ_{(b,j): p_bj > 0} p_bj ℓ(x_b, z_bj) - λ (1/B) Σ_b H(p_b)`, one decoder call on
/// every supported (example, vector) pair.
///
/// # Shapes
/// `scores`: `[B, D]`.
pub fn marginalize_bits(
    kind: &SparseBits,
    scores: Tensor<2>,
    entropy_coeff: f64,
    decoder: &mut Decoder<'_>,
) -> Result<Step, MappingError> {
    let [batch, bits] = scores.dims();
    let (configs, probs) = match kind {
        SparseBits::TopK { k } => {
            let out = mappings::topk_sparsemax(scores, *k)?;
            (out.configs, out.probs)
        }
        SparseBits::SparseMap(options) => {
            let out = mappings::sparsemap(scores, options)?;
            (out.configs, out.probs)
        }
    };

    // The supported pairs and their vectors, decoded in one call.
    let width = probs.dims()[1];
    let (weights, vectors) = (read_f32(&probs)?, read_f32(&configs)?);
    let pairs: Vec<(usize, usize)> = (0..batch * width)
        .filter(|&i| weights[i] > 0.0)
        .map(|i| (i / width, i % width))
        .collect();
    let mut rows = Vec::with_capacity(pairs.len() * bits);
    for &(b, j) in &pairs {
        rows.extend_from_slice(&vectors[(b * width + j) * bits..][..bits]);
    }
    let latent =
        Tensor::<2>::from_data(TensorData::new(rows, [pairs.len(), bits]), &probs.device());
    let examples: Vec<usize> = pairs.iter().map(|p| p.0).collect();
    let losses = decoder(&examples, latent);

    let expected = pick(probs.clone(), &pairs)
        .mul(losses)
        .sum()
        .div_scalar(batch as f64);
    let loss = scalar(expected.clone())?;
    let entropy = mappings::entropy(probs).mean();
    Ok(Step {
        surrogate: expected.sub(entropy.mul_scalar(entropy_coeff)),
        loss,
        decoder_calls: pairs.len(),
        weights: pairs.iter().map(|&(b, j)| weights[b * width + j]).collect(),
    })
}

/// `H(q)` per example of the mean-field Bernoulli, `[B]`.
fn bernoulli_entropy(scores: Tensor<2>) -> Tensor<1> {
    let [batch, _] = scores.dims();
    let p = sigmoid(scores.clone());
    softplus(scores.clone(), 1.0)
        .sub(p.mul(scores))
        .sum_dim(1)
        .reshape([batch])
}

/// `draws` independent samples `z ~ q` per example, stacked draw by draw: `[draws·B, D]`.
fn sample_bits(
    scores: &Tensor<2>,
    draws: usize,
    rng: &mut impl Rng,
) -> Result<Tensor<2>, MappingError> {
    let [batch, bits] = scores.dims();
    let p = read_f32(&sigmoid(scores.clone()))?;
    let samples: Vec<f32> = (0..draws)
        .flat_map(|_| {
            p.iter()
                .map(|&pi| f32::from(u8::from(rng.random::<f32>() < pi)))
                .collect::<Vec<_>>()
        })
        .collect();
    Ok(Tensor::from_data(
        TensorData::new(samples, [draws * batch, bits]),
        &scores.device(),
    ))
}

/// `log q(z) = s·z - Σ_i softplus(s_i)` per example, `[B]`.
fn bernoulli_log_prob(z: Tensor<2>, scores: Tensor<2>) -> Tensor<1> {
    let [batch, _] = scores.dims();
    z.mul(scores.clone())
        .sub(softplus(scores, 1.0))
        .sum_dim(1)
        .reshape([batch])
}

/// Bernoulli SFE or SFE+ over bit vectors (reference §4.1), with the baseline's state.
#[derive(Debug, Clone, PartialEq)]
pub struct BernoulliScoreFunction {
    /// The baseline (the running average is updated after each training step).
    pub baseline: Baseline,
    /// Whether steps update the running average (true in training, false in evaluation).
    pub training: bool,
}

impl BernoulliScoreFunction {
    /// One training step: `L = mean[(ℓ - β)_det log q(z) + ℓ] - λ mean H(q)`.
    ///
    /// # Shapes
    /// `scores`: `[B, D]`.
    pub fn step(
        &mut self,
        scores: Tensor<2>,
        entropy_coeff: f64,
        decoder: &mut Decoder<'_>,
        rng: &mut impl Rng,
    ) -> Result<Step, MappingError> {
        let [batch, _] = scores.dims();
        let draws = if self.baseline == Baseline::Sample {
            2
        } else {
            1
        };
        let latent = sample_bits(&scores, draws, rng)?;
        let examples: Vec<usize> = (0..draws).flat_map(|_| 0..batch).collect();
        let losses = decoder(&examples, latent.clone());
        let loss = losses.clone().narrow(0, 0, batch);
        let loss_mean = scalar(loss.clone().mean())?;
        let log_q = bernoulli_log_prob(latent.narrow(0, 0, batch), scores.clone());
        let advantage = self
            .baseline
            .advantage(&losses, batch, loss_mean, self.training);
        let entropy = bernoulli_entropy(scores).mean();
        let surrogate = advantage
            .mul(log_q)
            .add(loss)
            .mean()
            .sub(entropy.mul_scalar(entropy_coeff));
        Ok(Step {
            surrogate,
            loss: loss_mean,
            decoder_calls: draws * batch,
            weights: (0..draws * batch)
                .map(|i| f32::from(u8::from(i < batch)))
                .collect(),
        })
    }
}

/// Bernoulli NVIL (reference §4.2): one sample `z ~ q`, the learned baseline `b_ψ(x)` given
/// by the task's network:
/// `L = mean[(ℓ - b)_det log q(z) + ℓ + (ℓ_det - b)²] - λ mean H(q)`.
///
/// # Shapes
/// `scores`: `[B, D]`, `baseline`: `[B]`.
pub fn bernoulli_nvil_step(
    scores: Tensor<2>,
    baseline: Tensor<1>,
    entropy_coeff: f64,
    decoder: &mut Decoder<'_>,
    rng: &mut impl Rng,
) -> Result<Step, MappingError> {
    let [batch, _] = scores.dims();
    let z = sample_bits(&scores, 1, rng)?;
    let examples: Vec<usize> = (0..batch).collect();
    let loss = decoder(&examples, z.clone());
    let log_q = bernoulli_log_prob(z, scores.clone());
    let entropy = bernoulli_entropy(scores).mean().mul_scalar(entropy_coeff);
    learned_baseline_step(loss, log_q, baseline, entropy)
}

/// Bernoulli Gumbel (binary concrete) step at temperature `tau` (reference §4.3):
/// `y_i = σ((s_i + log u_i - log(1 - u_i)) / τ)`; straight-through feeds `1[y > ½]` forward.
///
/// # Shapes
/// `scores`: `[B, D]`.
pub fn bernoulli_gumbel_step(
    scores: Tensor<2>,
    tau: f64,
    straight_through: bool,
    entropy_coeff: f64,
    decoder: &mut Decoder<'_>,
    rng: &mut impl Rng,
) -> Result<Step, MappingError> {
    let [batch, bits] = scores.dims();
    let eps = f64::from(f32::EPSILON);
    let logistic: Vec<f32> = (0..batch * bits)
        .map(|_| {
            let u = rng.random::<f64>().clamp(eps, 1.0 - eps);
            (u.ln() - (1.0 - u).ln()) as f32
        })
        .collect();
    let noise = Tensor::<2>::from_data(TensorData::new(logistic, [batch, bits]), &scores.device());
    let relaxed = sigmoid(scores.clone().add(noise).div_scalar(tau));
    let latent = if straight_through {
        let hard = relaxed.clone().greater_elem(0.5).float().detach();
        hard.add(relaxed.clone().sub(relaxed.detach()))
    } else {
        relaxed
    };
    let examples: Vec<usize> = (0..batch).collect();
    let expected = decoder(&examples, latent).mean();
    let loss = scalar(expected.clone())?;
    let entropy = bernoulli_entropy(scores).mean();
    Ok(Step {
        surrogate: expected.sub(entropy.mul_scalar(entropy_coeff)),
        loss,
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
    use crate::mappings::Init;

    #[test]
    fn sparsemap_marginalization_gradient_is_half_theta_on_fractional_bits() {
        // With ℓ(z) = θ·z, E_p[ℓ] = θ·μ, and μ = clip((s + 1) / 2, 0, 1) by reference
        // §5.2; so ∂/∂s_i = θ_i / 2 where 0 < μ_i < 1 and 0 where μ_i is clipped (by hand).
        let s = [0.4f32, -0.6, 2.0, 0.1, -1.5];
        let theta = [1.0f32, -2.0, 0.5, 3.0, 4.0];
        let scores = toy::param(&s);
        let th = toy::param(&theta);
        let options = SparseMapOptions {
            init: Init::Random { seed: 3 },
            ..Default::default()
        };
        let step = marginalize_bits(
            &SparseBits::SparseMap(options),
            scores.clone(),
            0.0,
            &mut *toy::decoder(&th),
        )
        .unwrap();
        let g = toy::values(&scores.grad(&step.surrogate.backward()).unwrap());
        let expected = [0.5, -1.0, 0.0, 1.5, 0.0];
        for (a, b) in g.iter().zip(expected) {
            assert!((a - b).abs() < 1e-4, "{g:?}");
        }
        // E[ℓ] = θ·μ with μ = [0.7, 0.2, 1, 0.55, 0].
        assert!(
            (step.loss - (0.7 - 0.4 + 0.5 + 1.65)).abs() < 1e-5,
            "{}",
            step.loss
        );
        assert!(step.decoder_calls >= 2 && step.decoder_calls <= 4);
    }

    #[test]
    fn topk_marginalization_is_exact_and_calls_the_decoder_on_the_support() {
        let scores = toy::param(&[0.3, -0.2, 0.05]);
        let th = toy::param(&[1.0, 1.0, 1.0]);
        let step = marginalize_bits(
            &SparseBits::TopK { k: 4 },
            scores,
            0.0,
            &mut *toy::decoder(&th),
        )
        .unwrap();
        // Top 4 scores: 0.35 {0,2}, 0.3 {0}, 0.15 {0,1,2}, 0.1 {0,1}; sparsemax over them keeps
        // all four (1 + 4·0.1 > 0.9) with τ = -0.025: weights [0.375, 0.325, 0.175, 0.125].
        // With θ = 1, ℓ counts the bits on: E[ℓ] = 0.75 + 0.325 + 0.525 + 0.25 = 1.85.
        assert_eq!(step.decoder_calls, 4);
        let expected = 1.85;
        assert!((step.loss - expected).abs() < 1e-5, "{}", step.loss);
    }

    #[test]
    fn bernoulli_sfe_is_unbiased() {
        // ∂/∂s_i E_q[θ·z] = θ_i σ(s_i) (1 - σ(s_i)), by hand; within 5 standard errors.
        let s = [0.5f32, -1.0, 0.2];
        let theta = [1.0f32, 2.0, -1.5];
        for (mut estimator, calls) in [
            (
                BernoulliScoreFunction {
                    baseline: Baseline::RunningAverage {
                        mean: 0.0,
                        steps: 0,
                    },
                    training: true,
                },
                1,
            ),
            (
                BernoulliScoreFunction {
                    baseline: Baseline::Sample,
                    training: true,
                },
                2,
            ),
        ] {
            let mut rng = ChaCha8Rng::seed_from_u64(8);
            let mut grad = toy::MonteCarlo::new(3);
            for _ in 0..3000 {
                let scores = toy::param(&s);
                let th = toy::param(&theta);
                let step = estimator
                    .step(scores.clone(), 0.0, &mut *toy::decoder(&th), &mut rng)
                    .unwrap();
                assert_eq!(step.decoder_calls, calls);
                grad.add(&toy::values(
                    &scores.grad(&step.surrogate.backward()).unwrap(),
                ));
            }
            let exact: Vec<f64> = s
                .iter()
                .zip(theta)
                .map(|(&si, t)| {
                    let sig = 1.0 / (1.0 + (-f64::from(si)).exp());
                    f64::from(t) * sig * (1.0 - sig)
                })
                .collect();
            grad.assert_matches(&exact, "ds");
        }
    }

    #[test]
    fn bernoulli_nvil_regresses_its_baseline_towards_the_loss() {
        // With θ = [1, 1] and s = 0, ℓ = z_1 + z_2 has mean 1; the baseline gradient
        // 2 (b - ℓ) averages to 2 (b - 1) (by hand), within 5 standard errors (ℓ ∈ [0, 2]).
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let th = toy::param(&[1.0, 1.0]);
        let steps = 2000;
        let mut sum_b = 0.0;
        for _ in 0..steps {
            let b = Tensor::<1>::from_floats([0.5], &toy::device()).require_grad();
            let step = bernoulli_nvil_step(
                toy::param(&[0.0, 0.0]),
                b.clone(),
                0.0,
                &mut *toy::decoder(&th),
                &mut rng,
            )
            .unwrap();
            assert_eq!(step.decoder_calls, 1);
            sum_b += f64::from(toy::values(&b.grad(&step.surrogate.backward()).unwrap())[0]);
        }
        let n = f64::from(steps);
        assert!(
            (sum_b / n - 2.0 * (0.5 - 1.0)).abs() < 5.0 * 2.0 / n.sqrt(),
            "{}",
            sum_b / n
        );
    }

    #[test]
    fn straight_through_forward_is_a_sample_not_the_mode() {
        // Deviation O5: at s = 0 the mode 1[s > 0] is always 0, while the rounded relaxed
        // sample is 1 half the time; over 400 draws both values must appear.
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let theta = toy::param(&[1.0]);
        let mut ones = 0;
        for _ in 0..400 {
            let mut decoder = |_: &[usize], latent: Tensor<2>| {
                ones += usize::from(toy::values(&latent)[0] == 1.0);
                latent.matmul(theta.clone().transpose()).reshape([1])
            };
            bernoulli_gumbel_step(toy::param(&[0.0]), 0.5, true, 0.0, &mut decoder, &mut rng)
                .unwrap();
        }
        // Binomial(400, ½): mean 200, sd 10.
        assert!((150..=250).contains(&ones), "{ones} ones");
    }

    #[test]
    fn straight_through_bits_are_hard_forward() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let theta = toy::param(&[1.0, -1.0, 0.5, 0.25]);
        let mut seen = Vec::new();
        let mut decoder = |_: &[usize], latent: Tensor<2>| {
            seen.extend(toy::values(&latent));
            latent.matmul(theta.clone().transpose()).reshape([1])
        };
        let scores = toy::param(&[0.2, 0.1, -0.3, 0.0]);
        let step =
            bernoulli_gumbel_step(scores.clone(), 0.5, true, 0.0, &mut decoder, &mut rng).unwrap();
        assert!(seen.iter().all(|&v| v == 0.0 || v == 1.0), "{seen:?}");
        let g = toy::values(&scores.grad(&step.surrogate.backward()).unwrap());
        assert!(g.iter().any(|v| v.abs() > 1e-6));
    }
}
