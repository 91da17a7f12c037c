//! Gradient estimators and marginalizations for a categorical latent (reference §3): each
//! turns encoder scores `s ∈ R^{B×K}` and a decoder into a scalar surrogate whose gradient is
//! the estimator's, and counts the decoder calls it made. The decoder is called once per
//! batch on every (example, latent value) pair the estimator needs, never once per category.
//!
//! Implemented here: dense and sparse marginalization, SFE, SFE+, Gumbel-Softmax, straight-
//! through Gumbel and Sum&Sample; for bit vectors ([`bits`]), top-k sparsemax and SparseMAP
//! marginalization, Bernoulli SFE, SFE+, NVIL and Gumbel. NVIL takes the outputs of a
//! baseline network that the task owns.

pub mod bits;
pub mod gumbel;
pub mod latent;
pub mod marginal;
pub mod nvil;
pub mod score_function;
pub mod sum_and_sample;

use burn::tensor::{Int, Tensor, TensorData};

use crate::error::MappingError;
use crate::mappings::autodiff::read_f32;

/// The decoder as an estimator sees it: given, for `N` (example, latent) pairs, the example
/// index of each pair and the latent as a row of a `[N, K]` matrix (one-hot or relaxed),
/// returns the downstream loss `ℓ` of each pair, `[N]`, differentiable in the decoder.
pub type Decoder<'a> = dyn FnMut(&[usize], Tensor<2>) -> Tensor<1> + 'a;

/// What one estimator step produced.
#[derive(Debug, Clone)]
pub struct Step {
    /// Scalar surrogate (shape `[1]`): backpropagate this.
    pub surrogate: Tensor<1>,
    /// The batch mean of the loss under the estimator's semantics (exact expectation for
    /// marginalization, the sampled loss for SFE), without the entropy term.
    pub loss: f64,
    /// Decoder calls made: (example, latent) pairs decoded in this batch.
    pub decoder_calls: usize,
    /// The weight of each decoded pair, in decoding order, in the reported `loss`:
    /// `loss = Σ_i weights_i ℓ_i / B`. Any per-pair quantity (a game's success) averages the
    /// same way. Baseline-only pairs weigh 0.
    pub weights: Vec<f32>,
}

/// The value of a one-element tensor, read back as `f64`.
pub(crate) fn scalar(t: Tensor<1>) -> Result<f64, MappingError> {
    Ok(f64::from(read_f32(&t.reshape([1, 1]))?[0]))
}

/// One-hot rows `[N, K]` for the classes `classes`, on `like`'s device.
pub(crate) fn one_hot(classes: &[usize], k: usize, like: &Tensor<2>) -> Tensor<2> {
    let mut rows = vec![0.0f32; classes.len() * k];
    for (r, &c) in classes.iter().enumerate() {
        rows[r * k + c] = 1.0;
    }
    Tensor::from_data(TensorData::new(rows, [classes.len(), k]), &like.device())
}

/// `values[b * k + c]` for each (b, c) pair, as a differentiable `[N]` tensor.
pub(crate) fn pick(values: Tensor<2>, pairs: &[(usize, usize)]) -> Tensor<1> {
    let [rows, k] = values.dims();
    let flat: Vec<i64> = pairs.iter().map(|&(b, c)| (b * k + c) as i64).collect();
    let index = Tensor::<1, Int>::from_data(TensorData::new(flat, [pairs.len()]), &values.device());
    values.reshape([rows * k]).select(0, index)
}

#[cfg(test)]
pub(crate) mod toy {
    //! A model small enough to enumerate: K classes, one example, decoder loss `ℓ(c) = θ_c`
    //! with learnable `θ`, so `E_π[ℓ] = Σ_c π_c θ_c` is exact and its gradients are known.

    use burn::tensor::{Device, Tensor, TensorData};

    use super::Decoder;

    pub fn device() -> Device {
        Device::flex().autodiff()
    }

    pub fn param(values: &[f32]) -> Tensor<2> {
        Tensor::from_data(
            TensorData::new(values.to_vec(), [1, values.len()]),
            &device(),
        )
        .require_grad()
    }

    /// `ℓ = latent · θ`: the loss of a one-hot row is `θ_c`.
    pub fn decoder(theta: &Tensor<2>) -> Box<Decoder<'_>> {
        Box::new(move |_examples: &[usize], latent: Tensor<2>| {
            let n = latent.dims()[0];
            latent.matmul(theta.clone().transpose()).reshape([n])
        })
    }

    /// Running mean and standard error of a gradient over Monte Carlo steps.
    pub struct MonteCarlo {
        steps: f64,
        sum: Vec<f64>,
        sum_sq: Vec<f64>,
    }

    impl MonteCarlo {
        pub fn new(dim: usize) -> Self {
            Self {
                steps: 0.0,
                sum: vec![0.0; dim],
                sum_sq: vec![0.0; dim],
            }
        }

        pub fn add(&mut self, gradient: &[f32]) {
            self.steps += 1.0;
            for ((s, q), &g) in self.sum.iter_mut().zip(&mut self.sum_sq).zip(gradient) {
                *s += f64::from(g);
                *q += f64::from(g).powi(2);
            }
        }

        /// Asserts every mean is within five standard errors (plus 1e-3) of `exact`.
        pub fn assert_matches(&self, exact: &[f64], what: &str) {
            for (i, &want) in exact.iter().enumerate() {
                let mean = self.sum[i] / self.steps;
                let stderr = ((self.sum_sq[i] / self.steps - mean * mean) / self.steps).sqrt();
                assert!(
                    (mean - want).abs() < 5.0 * stderr + 1e-3,
                    "{what}[{i}]: {mean} vs {want}"
                );
            }
        }
    }

    /// The exact gradient of `E_q[θ_z]` in the scores for `q = softmax(s)`, by hand:
    /// `∂/∂s_c = q_c (θ_c - Σ_j q_j θ_j)`; also returns `q`.
    pub fn softmax_expectation_gradient(s: &[f32], theta: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let e: Vec<f64> = s.iter().map(|&v| f64::from(v).exp()).collect();
        let q: Vec<f64> = e.iter().map(|v| v / e.iter().sum::<f64>()).collect();
        let mean: f64 = q.iter().zip(theta).map(|(q, &t)| q * f64::from(t)).sum();
        let grad = q
            .iter()
            .zip(theta)
            .map(|(q, &t)| q * (f64::from(t) - mean))
            .collect();
        (grad, q)
    }

    pub fn values<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
        crate::mappings::autodiff::read_f32(t).unwrap()
    }
}
