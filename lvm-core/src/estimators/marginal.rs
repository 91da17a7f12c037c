//! Exact marginalization (reference §3.6): `π = softmax(s)` (dense) or `sparsemax(s)`
//! (sparse), and the objective `mean_b Σ_c π_bc ℓ(x_b, c) - λ mean_b H(π_b)` computed by one
//! decoder call on every (example, class) pair with `π_bc > 0`. Deviation from the original:
//! it decoded every class with mass in *any* example for the *whole* batch (O10); here only
//! the pairs with non-zero weight are decoded, so sparse marginalization costs the support.

use burn::tensor::Tensor;
use burn::tensor::activation::softmax;

use super::{Decoder, Step, one_hot, pick, scalar};
use crate::error::MappingError;
use crate::mappings::{self, autodiff::read_f32};

/// Which distribution is marginalized over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalizer {
    /// Dense: every class, `K` decoder calls per example.
    Softmax,
    /// Sparse: the sparsemax support only.
    Sparsemax,
}

/// One marginalization step.
///
/// ```text
/// π = normalize(s),   L = (1/B) Σ_{(b,c): π_bc > 0} π_bc ℓ(x_b, c) - λ (1/B) Σ_b H(π_b)
/// ```
///
/// The gradient is exact, into the decoder through `ℓ` and into the scores through `π`.
///
/// # Shapes
/// `scores`: `[B, K]`.
pub fn marginalize(
    normalizer: Normalizer,
    scores: Tensor<2>,
    entropy_coeff: f64,
    decoder: &mut Decoder<'_>,
) -> Result<Step, MappingError> {
    let [batch, k] = scores.dims();
    let probs = match normalizer {
        Normalizer::Softmax => softmax(scores, 1),
        Normalizer::Sparsemax => mappings::sparsemax(scores)?,
    };

    // Every (example, class) pair with positive weight, decoded in one call.
    let weights = read_f32(&probs)?;
    // Softmax decodes every class (an entry that underflowed to 0 still counts: K per example).
    let pairs: Vec<(usize, usize)> = (0..batch * k)
        .filter(|&i| normalizer == Normalizer::Softmax || weights[i] > 0.0)
        .map(|i| (i / k, i % k))
        .collect();
    let examples: Vec<usize> = pairs.iter().map(|p| p.0).collect();
    let classes: Vec<usize> = pairs.iter().map(|p| p.1).collect();
    let losses = decoder(&examples, one_hot(&classes, k, &probs));

    // L = Σ π ℓ / B - λ mean H.
    let expected = pick(probs.clone(), &pairs)
        .mul(losses)
        .sum()
        .div_scalar(batch as f64);
    let entropy = mappings::entropy(probs).mean();
    let loss = scalar(expected.clone())?;
    let surrogate = expected.sub(entropy.mul_scalar(entropy_coeff));
    Ok(Step {
        surrogate,
        loss,
        decoder_calls: pairs.len(),
        weights: pairs.iter().map(|&(b, c)| weights[b * k + c]).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimators::toy;
    use crate::mappings::sparsemax::sparsemax as sparsemax_kernel;

    /// The exact objective by enumeration, independently of the estimator: `Σ_c π_c θ_c - λ H`.
    fn objective(normalizer: Normalizer, s: &[f32], theta: &[f32], lambda: f64) -> f64 {
        let pi: Vec<f64> = match normalizer {
            Normalizer::Softmax => {
                let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f64> = s.iter().map(|&v| f64::from(v - max).exp()).collect();
                let total: f64 = e.iter().sum();
                e.iter().map(|v| v / total).collect()
            }
            Normalizer::Sparsemax => sparsemax_kernel(s, s.len())
                .unwrap()
                .iter()
                .map(|&p| f64::from(p))
                .collect(),
        };
        let h: f64 = pi.iter().filter(|p| **p > 0.0).map(|p| -p * p.ln()).sum();
        pi.iter()
            .zip(theta)
            .map(|(p, &t)| p * f64::from(t))
            .sum::<f64>()
            - lambda * h
    }

    #[test]
    fn gradients_are_exact_by_finite_differences_and_calls_count_the_support() {
        let s = [0.9f32, 0.5, -0.3, 0.1];
        let theta = [1.0f32, -0.5, 2.0, 0.3];
        let lambda = 0.1;
        for (normalizer, calls) in [(Normalizer::Softmax, 4), (Normalizer::Sparsemax, 2)] {
            let scores = toy::param(&s);
            let th = toy::param(&theta);
            let step =
                marginalize(normalizer, scores.clone(), lambda, &mut *toy::decoder(&th)).unwrap();
            // sparsemax([.9, .5, -.3, .1]): support {0, 1}, τ = 0.2, π = [0.7, 0.3, 0, 0].
            assert_eq!(step.decoder_calls, calls, "{normalizer:?}");
            let grads = step.surrogate.backward();
            let g_s = toy::values(&scores.grad(&grads).unwrap());
            let g_theta = toy::values(&th.grad(&grads).unwrap());
            let h = 1e-3;
            for i in 0..4 {
                let shifted = |v: &[f32], d: f32| {
                    let mut v = v.to_vec();
                    v[i] += d;
                    v
                };
                let fd_s = (objective(normalizer, &shifted(&s, h), &theta, lambda)
                    - objective(normalizer, &shifted(&s, -h), &theta, lambda))
                    / (2.0 * f64::from(h));
                let fd_t = (objective(normalizer, &s, &shifted(&theta, h), lambda)
                    - objective(normalizer, &s, &shifted(&theta, -h), lambda))
                    / (2.0 * f64::from(h));
                assert!(
                    (fd_s - f64::from(g_s[i])).abs() < 2e-3,
                    "{normalizer:?} ds{i}"
                );
                assert!(
                    (fd_t - f64::from(g_theta[i])).abs() < 2e-3,
                    "{normalizer:?} dθ{i}"
                );
            }
            let exact = objective(normalizer, &s, &theta, 0.0);
            assert!(
                (step.loss - exact).abs() < 1e-5,
                "{normalizer:?}: {} vs {exact}",
                step.loss
            );
        }
    }
}
