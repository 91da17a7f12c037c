//! Dense layers and multilayer perceptrons initialized from a seeded generator with
//! PyTorch's defaults (reference §10): weights and biases `U(±1/√fan_in)`, embeddings
//! `N(0, 1)`. Burn's own initializers draw from a process-wide generator, which would make
//! two trials in one process depend on each other; these do not.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor, TensorData};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A `[rows, cols]` tensor with entries `U(-bound, bound)`.
pub fn uniform(
    rows: usize,
    cols: usize,
    bound: f64,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Tensor<2> {
    let values: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect();
    Tensor::from_data(TensorData::new(values, [rows, cols]), device)
}

/// A `[rows, cols]` tensor with entries `N(0, 1)`.
pub fn normal(rows: usize, cols: usize, rng: &mut ChaCha8Rng, device: &Device) -> Tensor<2> {
    let values: Vec<f32> = (0..rows * cols)
        .map(|_| StandardNormal.sample(rng))
        .collect();
    Tensor::from_data(TensorData::new(values, [rows, cols]), device)
}

/// A linear layer `d_in → d_out` with PyTorch's default initialization.
pub fn linear(
    d_in: usize,
    d_out: usize,
    bias: bool,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Linear {
    let bound = 1.0 / (d_in as f64).sqrt();
    let weight = Param::from_tensor(uniform(d_in, d_out, bound, rng, device));
    let bias = bias.then(|| {
        let b = uniform(1, d_out, bound, rng, device).reshape([d_out]);
        Param::from_tensor(b)
    });
    Linear { weight, bias }
}

/// Linear layers with ReLU between them (none after the last).
#[derive(Module, Debug)]
pub struct Mlp {
    /// The layers, input first.
    pub layers: Vec<Linear>,
}

impl Mlp {
    /// An MLP through the given widths, `widths[0]` the input.
    pub fn new(widths: &[usize], rng: &mut ChaCha8Rng, device: &Device) -> Self {
        let layers = widths
            .windows(2)
            .map(|w| linear(w[0], w[1], true, rng, device))
            .collect();
        Self { layers }
    }

    /// `[N, widths[0]] → [N, widths.last()]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        self.layers.iter().enumerate().fold(x, |h, (i, layer)| {
            let out = layer.forward(h);
            if i < last { relu(out) } else { out }
        })
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::mappings::autodiff::read_f32;

    #[test]
    fn initialization_is_seeded_and_bounded() {
        let device = Device::flex();
        let a = Mlp::new(&[784, 16, 3], &mut ChaCha8Rng::seed_from_u64(5), &device);
        let b = Mlp::new(&[784, 16, 3], &mut ChaCha8Rng::seed_from_u64(5), &device);
        let (wa, wb) = (
            read_f32(&a.layers[0].weight.val()).unwrap(),
            read_f32(&b.layers[0].weight.val()).unwrap(),
        );
        assert_eq!(wa, wb);
        // U(±1/√784) = U(±1/28): bounded, and with 12544 draws the variance is near
        // (1/28)²/3 (the variance of a uniform on [-a, a] is a²/3).
        let bound = 1.0f64 / 28.0;
        assert!(wa.iter().all(|w| f64::from(w.abs()) < bound));
        let var = wa.iter().map(|w| f64::from(*w).powi(2)).sum::<f64>() / wa.len() as f64;
        assert!((var / (bound * bound / 3.0) - 1.0).abs() < 0.05, "{var}");
        let out = a.forward(Tensor::zeros([2, 784], &device));
        assert_eq!(out.dims(), [2, 3]);
    }
}
