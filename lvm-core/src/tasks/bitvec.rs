//! The bit-vector VAE on Fashion-MNIST (reference §9): an encoder gives `D` bit scores, a
//! generator maps a bit vector (or a relaxed one) to a rank-5 factorization of a 256-way
//! categorical per pixel, the prior is uniform. Training minimizes `E_q[ℓ] - H(q)`, i.e.
//! `-ELBO - D log 2`.
//!
//! Evaluation reports `-ELBO` and the negative log-likelihood in bits per dimension,
//! estimated by importance sampling: with the encoder's Bernoulli as proposal for the
//! sampling estimators, and for the sparse ones the exact sum over the support plus a
//! uniform-proposal estimate of the mass *outside* the support (the original adds a
//! whole-space estimate to the support sum, counting the support twice; §11 O9).

use std::collections::HashSet;
use std::f64::consts::LN_2;

use burn::module::Module;
use burn::nn::Linear;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::layers::{Mlp, linear};
use super::ssvae::optimizer;
use super::{EpochRng, Metrics, ModelState, Stage, StagePlan, StepOutcome, TaskModel, TrainError};
use crate::data::{DataDir, IMAGE_PIXELS, ImageSet, known};
use crate::estimators::latent::{LatentEstimator, for_spec};
use crate::likelihood::{pixel_nll_fused, pixel_nll_materialized};
use crate::mappings::autodiff::read_f32;
use crate::spec::{Estimator, TrialSpec};

/// Training images: the first 55,000 of the training set (the rest is validation).
pub const TRAIN_IMAGES: usize = 55_000;
/// Rank of the per-pixel logit factorization.
const RANK: usize = 5;
/// Values a pixel takes.
const LEVELS: usize = 256;
/// Hidden width of encoder and generator.
const HIDDEN: usize = 128;
/// Importance samples decoded together.
const SAMPLE_CHUNK: usize = 16;

/// Encoder, generator and NVIL's baseline network.
#[derive(Module, Debug)]
pub struct BitvecNet {
    /// `784 → 128 → D` bit scores.
    pub encoder: Mlp,
    /// `D → 128 → 784·5`.
    pub generator: Mlp,
    /// The shared `5 → 256` projection to pixel logits (with bias).
    pub projection: Linear,
    /// NVIL's baseline `b_ψ(x)`: `784 → 512 → 512 → 512 → 1`.
    pub baseline: Option<Mlp>,
}

impl BitvecNet {
    /// Fresh networks for `bits` bits.
    pub fn new(bits: usize, nvil: bool, rng: &mut ChaCha8Rng, device: &Device) -> Self {
        Self {
            encoder: Mlp::new(&[IMAGE_PIXELS, HIDDEN, bits], rng, device),
            generator: Mlp::new(&[bits, HIDDEN, IMAGE_PIXELS * RANK], rng, device),
            projection: linear(RANK, LEVELS, true, rng, device),
            baseline: nvil.then(|| Mlp::new(&[IMAGE_PIXELS, 512, 512, 512, 1], rng, device)),
        }
    }

    /// `ℓ = -log p(x | z)` in nats per row, `targets` the raw pixels of each row.
    ///
    /// # Shapes
    /// `z`: `[N, D]` → `[N]`.
    pub fn nll(&self, z: Tensor<2>, targets: &[u8], fused: bool) -> Tensor<1> {
        let n = z.dims()[0];
        let h = self.generator.forward(z).reshape([n, IMAGE_PIXELS, RANK]);
        let w = self.projection.weight.val();
        let c = self
            .projection
            .bias
            .as_ref()
            .expect("the projection has a bias")
            .val();
        if fused {
            // Non-finite generator outputs (a diverged model) give a NaN loss, which the
            // training loop reports with the step.
            let device = h.device();
            pixel_nll_fused(h, w, c, targets)
                .unwrap_or_else(|_| Tensor::full([n], f32::NAN, &device))
        } else {
            pixel_nll_materialized(h, w, c, targets)
        }
    }
}

/// The bit-vector VAE task.
pub struct Bitvec {
    spec: TrialSpec,
    bits: usize,
    net: BitvecNet,
    optim: ModuleOptimizer,
    estimator: Box<dyn LatentEstimator>,
    device: Device,
    /// The fused CPU likelihood (flex) or the materialized one (other devices).
    fused: bool,
    train: ImageSet,
    test: ImageSet,
    order: Vec<usize>,
}

impl Bitvec {
    /// Loads Fashion-MNIST and initializes the networks from the seed.
    pub fn new(spec: &TrialSpec, data: &DataDir, device: &Device) -> Result<Self, TrainError> {
        let mut train = ImageSet::load(
            data,
            &known::FASHION_TRAIN_IMAGES,
            &known::FASHION_TRAIN_LABELS,
        )?;
        train.pixels.truncate(TRAIN_IMAGES * IMAGE_PIXELS);
        train.labels.truncate(TRAIN_IMAGES);
        let test = ImageSet::load(
            data,
            &known::FASHION_TEST_IMAGES,
            &known::FASHION_TEST_LABELS,
        )?;
        let bits = spec.hyper.bits.unwrap_or(32);
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let net = BitvecNet::new(bits, spec.estimator == Estimator::Nvil, &mut rng, device);
        Ok(Self {
            spec: spec.clone(),
            bits,
            net,
            optim: optimizer(spec),
            estimator: for_spec(spec),
            device: device.clone(),
            fused: *device == Device::flex().autodiff() || *device == Device::flex(),
            train,
            test,
            order: Vec::new(),
        })
    }

    /// Runs the estimator on images `rows` of `set`; returns the step, the per-pair
    /// `(example, ℓ, bits)` the decoder saw, and the scores.
    fn run(&mut self, test: bool, rows: &[usize], rng: &mut EpochRng) -> Result<Run, TrainError> {
        let set = if test { &self.test } else { &self.train };
        let x = super::float_rows(&set.pixels, IMAGE_PIXELS, rows, &self.device);
        let mut pixels = Vec::with_capacity(rows.len() * IMAGE_PIXELS);
        for &i in rows {
            pixels.extend_from_slice(set.image(i));
        }
        let n = rows.len();
        let scores = self.net.encoder.forward(x.clone());
        let baseline = self
            .net
            .baseline
            .as_ref()
            .map(|b| b.forward(x).reshape([n]));
        let (net, fused, bits) = (&self.net, self.fused, self.bits);
        let mut seen = Vec::new();
        let mut decoder = |examples: &[usize], z: Tensor<2>| {
            let mut targets = Vec::with_capacity(examples.len() * IMAGE_PIXELS);
            for &b in examples {
                targets.extend_from_slice(&pixels[b * IMAGE_PIXELS..(b + 1) * IMAGE_PIXELS]);
            }
            // Evaluation keeps each pair's loss and bit vector for the likelihood estimate.
            let z_values = test.then(|| read_f32(&z).expect("latents are readable"));
            let loss = net.nll(z, &targets, fused);
            if let Some(z_values) = z_values {
                let values = read_f32(&loss).expect("losses are readable");
                for ((&b, v), row) in examples.iter().zip(values).zip(z_values.chunks(bits)) {
                    let key: Vec<u8> = row.iter().map(|&v| u8::from(v > 0.5)).collect();
                    seen.push((b, f64::from(v), key));
                }
            }
            loss
        };
        let step = self
            .estimator
            .step(scores.clone(), baseline, &mut decoder, &mut rng.latent)?;
        Ok(Run {
            step,
            seen,
            scores: read_f32(&scores)?,
            pixels,
        })
    }

    /// `log p̂(x)` per example of a test batch by importance sampling.
    fn log_likelihood(
        &self,
        run: &Run,
        n: usize,
        samples: usize,
        rng: &mut ChaCha8Rng,
    ) -> Vec<f64> {
        let d = self.bits;
        let sparse = matches!(
            self.spec.estimator,
            Estimator::TopkSparsemax | Estimator::Sparsemap | Estimator::SparsemapBudget
        );
        let weights = &run.step.weights;
        let mut support: Vec<HashSet<Vec<u8>>> = vec![HashSet::new(); n];
        let mut support_terms: Vec<Vec<f64>> = vec![Vec::new(); n];
        if sparse {
            for (i, (b, loss, key)) in run.seen.iter().enumerate() {
                if weights[i] > 0.0 && support[*b].insert(key.clone()) {
                    support_terms[*b].push(-loss - d as f64 * LN_2);
                }
            }
        }
        let mut terms: Vec<Vec<f64>> = vec![Vec::new(); n];
        // The batch's pixels once per sample of a chunk, built once.
        let targets = run.pixels.repeat(SAMPLE_CHUNK.min(samples));
        let mut done = 0;
        while done < samples {
            let chunk = SAMPLE_CHUNK.min(samples - done);
            let mut z = Vec::with_capacity(chunk * n * d);
            let mut log_r = Vec::with_capacity(chunk * n);
            for _ in 0..chunk {
                for b in 0..n {
                    let mut lr = 0.0;
                    for &s in &run.scores[b * d..(b + 1) * d] {
                        // Uniform proposal for the sparse methods, q(z | x) otherwise.
                        let p = if sparse { 0.5 } else { sigmoid(f64::from(s)) };
                        let on = rng.random::<f64>() < p;
                        z.push(f32::from(u8::from(on)));
                        lr += if sparse {
                            -LN_2
                        } else {
                            log_bernoulli(f64::from(s), on)
                        };
                    }
                    log_r.push(lr);
                }
            }
            let latent =
                Tensor::<2>::from_data(TensorData::new(z.clone(), [chunk * n, d]), &self.device);
            let pixels = &targets[..chunk * run.pixels.len()];
            let losses = read_f32(&self.net.nll(latent, pixels, self.fused)).unwrap_or_default();
            for (i, loss) in losses.iter().enumerate() {
                let b = i % n;
                if sparse {
                    let key: Vec<u8> = z[i * d..(i + 1) * d]
                        .iter()
                        .map(|&v| u8::from(v > 0.5))
                        .collect();
                    if support[b].contains(&key) {
                        continue;
                    }
                }
                terms[b].push(-f64::from(*loss) - d as f64 * LN_2 - log_r[i]);
            }
            done += chunk;
        }
        (0..n)
            .map(|b| {
                let sampled = log_sum_exp(&terms[b]) - (samples as f64).ln();
                if sparse {
                    log_sum_exp(&[log_sum_exp(&support_terms[b]), sampled])
                } else {
                    sampled
                }
            })
            .collect()
    }
}

/// One estimator run on a batch, with what evaluation needs.
struct Run {
    step: crate::estimators::Step,
    /// `(example, ℓ, bits)` of every decoded pair, in decoding order (evaluation only).
    seen: Vec<(usize, f64, Vec<u8>)>,
    scores: Vec<f32>,
    pixels: Vec<u8>,
}

fn sigmoid(s: f64) -> f64 {
    1.0 / (1.0 + (-s).exp())
}

/// `log Bernoulli(on; σ(s))`, stably.
fn log_bernoulli(s: f64, on: bool) -> f64 {
    let softplus = |v: f64| v.max(0.0) + (-v.abs()).exp().ln_1p();
    if on { -softplus(-s) } else { -softplus(s) }
}

/// `log Σ exp(v)`; `-∞` for no terms.
fn log_sum_exp(values: &[f64]) -> f64 {
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + values.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
}

impl TaskModel for Bitvec {
    fn plan(&self) -> Vec<StagePlan> {
        let h = &self.spec.hyper;
        vec![StagePlan {
            stage: Stage::Main,
            epochs: h.epochs,
            steps_per_epoch: super::batches(self.train.len(), h.batch_size),
        }]
    }

    fn train_step(
        &mut self,
        _stage: Stage,
        index: usize,
        rng: &mut EpochRng,
    ) -> Result<StepOutcome, TrainError> {
        if index == 0 {
            self.order = (0..self.train.len()).collect();
            self.order.shuffle(&mut rng.latent);
        }
        let rows = super::batch_of(&self.order, self.spec.hyper.batch_size, index).to_vec();
        let run = self.run(false, &rows, rng)?;
        let (surrogate, objective) = (run.step.surrogate, run.step.loss);
        let grads = GradientsParams::from_grads(surrogate.backward(), &self.net);
        self.net = self.optim.step(self.spec.hyper.lr, self.net.clone(), grads);
        Ok(StepOutcome {
            objective,
            decoder_calls: run.step.decoder_calls,
            examples: rows.len(),
        })
    }

    fn evaluate(&mut self, rng: &mut EpochRng) -> Result<Metrics, TrainError> {
        let limit = self
            .spec
            .hyper
            .test_limit
            .unwrap_or(usize::MAX)
            .min(self.test.len());
        let samples = self.spec.hyper.importance_samples.unwrap_or(1024);
        let batch = self.spec.hyper.batch_size;
        let d = self.bits as f64;
        self.estimator.set_training(false);
        let (mut neg_elbo, mut log_p) = (0.0, 0.0);
        let rows: Vec<usize> = (0..limit).collect();
        let mut result = Ok(());
        for chunk in rows.chunks(batch) {
            let run = match self.run(true, chunk, rng) {
                Ok(run) => run,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let n = chunk.len();
            let entropy = batch_entropy(&self.spec, &run, n, self.bits);
            neg_elbo += (run.step.loss - entropy + d * LN_2) * n as f64;
            log_p += self
                .log_likelihood(&run, n, samples, &mut rng.noise)
                .iter()
                .sum::<f64>();
        }
        self.estimator.set_training(true);
        result?;
        let mut metrics = Metrics::new();
        metrics.insert("test_neg_elbo".into(), neg_elbo / limit as f64);
        let bits_per_dim = -log_p / limit as f64 / (IMAGE_PIXELS as f64 * LN_2);
        metrics.insert("test_nll_bits_per_dim".into(), bits_per_dim);
        Ok(metrics)
    }

    super::checkpointed_methods!();
}

/// The batch-mean entropy of the approximate posterior: of the sparse distribution over the
/// support (from the step's weights), or of the mean-field Bernoulli.
fn batch_entropy(spec: &TrialSpec, run: &Run, n: usize, bits: usize) -> f64 {
    match spec.estimator {
        Estimator::TopkSparsemax | Estimator::Sparsemap | Estimator::SparsemapBudget => {
            let h: f64 = run
                .step
                .weights
                .iter()
                .filter(|&&w| w > 0.0)
                .map(|&w| -f64::from(w) * f64::from(w).ln())
                .sum();
            h / n as f64
        }
        _ => {
            let h: f64 = run.scores[..n * bits]
                .iter()
                .map(|&s| {
                    let s = f64::from(s);
                    let p = sigmoid(s);
                    -(p * log_bernoulli(s, true) + (1.0 - p) * log_bernoulli(s, false))
                })
                .sum();
            h / n as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sum_exp_and_bernoulli_log_probabilities_are_exact() {
        // log(e^1 + e^2) by hand; the empty sum is log 0.
        assert!((log_sum_exp(&[1.0, 2.0]) - (1f64.exp() + 2f64.exp()).ln()).abs() < 1e-12);
        assert_eq!(log_sum_exp(&[]), f64::NEG_INFINITY);
        // log σ(2) and log(1 - σ(2)) directly, and no overflow at ±800.
        assert!((log_bernoulli(2.0, true) - sigmoid(2.0).ln()).abs() < 1e-12);
        assert!((log_bernoulli(2.0, false) - (1.0 - sigmoid(2.0)).ln()).abs() < 1e-12);
        assert!((log_bernoulli(800.0, false) + 800.0).abs() < 1e-9);
        assert!(log_bernoulli(-800.0, false).abs() < 1e-12);
    }
}
