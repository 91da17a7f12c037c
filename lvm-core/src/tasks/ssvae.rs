//! The semi-supervised VAE on MNIST (reference §7): Kingma et al.'s M2 model with a
//! classifier `q(y | x)` as the discrete encoder, a Gaussian encoder `q(z | x, y)` and a
//! Bernoulli decoder `p(x | z, y)`. The "decoder call" of an estimator is one pass of the
//! VAE for a given label: encode, draw `z`, decode, `ℓ = -ELBO(x, y)`.
//!
//! Training has two stages: a labelled-only warm start (supervised loss only, with the
//! softmax cross-entropy or, for the sparsemax estimator, the sparsemax loss), then
//! semi-supervised training on pairs (labelled `i mod 5000`, unlabelled `i`), 704 steps per
//! epoch, with `supervised + 9 × unsupervised`. Images are binarized afresh at every access.

use burn::module::Module;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::store::ModuleRecord;
use burn::tensor::activation::{log_softmax, softplus};
use burn::tensor::{Bytes, Device, Int, Tensor, TensorData};
use rand::Rng;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::layers::{Mlp, normal};
use super::{EpochRng, Metrics, ModelState, Stage, StagePlan, StepOutcome, TaskModel, TrainError};
use crate::data::{DataDir, IMAGE_PIXELS, ImageSet, known, load_indices};
use crate::estimators::latent::{LatentEstimator, for_spec};
use crate::estimators::{Step, one_hot, pick};
use crate::mappings::{self, autodiff::read_f32};
use crate::spec::{Estimator, TrialSpec};

/// Classes of the discrete latent.
pub const CLASSES: usize = 10;
/// Size of the Gaussian latent (hard-coded in the original, §7.2).
pub const GAUSSIAN: usize = 8;
/// Weight of the unsupervised term: unlabelled / labelled examples, 45000 / 5000.
const UNSUPERVISED_WEIGHT: f64 = 9.0;

/// The networks of the M2 model (and NVIL's baseline network).
#[derive(Module, Debug)]
pub struct SsvaeNet {
    /// `q(y | x)`: 784 → 256 → 256 → 256 → 10.
    pub classifier: Mlp,
    /// `q(z | x, y)`: 794 → 128 → 128 → 16 (mean and log-std).
    pub encoder: Mlp,
    /// `p(x | z, y)`: 18 → 128 → 128 → 784 logits.
    pub decoder: Mlp,
    /// NVIL's baseline `b_ψ(x)`: 784 → 512 → 512 → 512 → 1.
    pub baseline: Option<Mlp>,
}

impl SsvaeNet {
    /// Fresh networks initialized from `rng`.
    pub fn new(nvil: bool, rng: &mut ChaCha8Rng, device: &Device) -> Self {
        let p = IMAGE_PIXELS;
        Self {
            classifier: Mlp::new(&[p, 256, 256, 256, CLASSES], rng, device),
            encoder: Mlp::new(&[p + CLASSES, 128, 128, 2 * GAUSSIAN], rng, device),
            decoder: Mlp::new(&[GAUSSIAN + CLASSES, 128, 128, p], rng, device),
            baseline: nvil.then(|| Mlp::new(&[p, 512, 512, 512, 1], rng, device)),
        }
    }

    /// `-ELBO(x, y)` per row with one reparameterized draw of `z` (reference §7.3):
    /// the Bernoulli negative log-likelihood plus `KL(q(z | x, y) ‖ N(0, I))`.
    ///
    /// # Shapes
    /// `x`: `[N, 784]` binary, `y`: `[N, 10]` one-hot or relaxed → `[N]`.
    pub fn neg_elbo(&self, x: Tensor<2>, y: Tensor<2>, noise: &mut ChaCha8Rng) -> Tensor<1> {
        let n = x.dims()[0];
        let h = self
            .encoder
            .forward(Tensor::cat(vec![x.clone(), y.clone()], 1));
        let mean = h.clone().narrow(1, 0, GAUSSIAN);
        let log_std = h.narrow(1, GAUSSIAN, GAUSSIAN);
        let eps = normal(n, GAUSSIAN, noise, &x.device());
        let z = mean.clone().add(log_std.clone().exp().mul(eps));
        let logits = self.decoder.forward(Tensor::cat(vec![z, y], 1));
        // -[x log σ(a) + (1 - x) log(1 - σ(a))] = softplus(a) - x a.
        let reconstruction = softplus(logits.clone(), 1.0).sub(x.mul(logits)).sum_dim(1);
        let kl = mean
            .powf_scalar(2.0)
            .add(log_std.clone().mul_scalar(2.0).exp())
            .sub_scalar(1.0)
            .sub(log_std.mul_scalar(2.0))
            .sum_dim(1)
            .mul_scalar(0.5);
        reconstruction.add(kl).reshape([n])
    }
}

/// The SSVAE task: networks, optimizer, estimator and data.
pub struct Ssvae {
    spec: TrialSpec,
    net: SsvaeNet,
    optim: ModuleOptimizer,
    estimator: Box<dyn LatentEstimator>,
    device: Device,
    train: ImageSet,
    test: ImageSet,
    labeled: Vec<usize>,
    unlabeled: Vec<usize>,
    order: Vec<usize>,
}

impl Ssvae {
    /// Loads MNIST and the split files, and initializes the networks from the seed.
    pub fn new(spec: &TrialSpec, data: &DataDir, device: &Device) -> Result<Self, TrainError> {
        let train = ImageSet::load(data, &known::MNIST_TRAIN_IMAGES, &known::MNIST_TRAIN_LABELS)?;
        let test = ImageSet::load(data, &known::MNIST_TEST_IMAGES, &known::MNIST_TEST_LABELS)?;
        let labeled = load_indices(data, &known::SSVAE_LABELED, train.len())?;
        let unlabeled = load_indices(data, &known::SSVAE_UNLABELED, train.len())?;
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let net = SsvaeNet::new(spec.estimator == Estimator::Nvil, &mut rng, device);
        Ok(Self {
            spec: spec.clone(),
            net,
            optim: optimizer(spec),
            estimator: for_spec(spec),
            device: device.clone(),
            train,
            test,
            labeled,
            unlabeled,
            order: Vec::new(),
        })
    }

    /// The supervised loss `mean[-ELBO(x, y) + CE(s(x), y)]` on a labelled batch; the
    /// sparsemax estimator uses the sparsemax loss in place of the cross-entropy.
    fn supervised(&self, indices: &[usize], rng: &mut ChaCha8Rng) -> Result<Tensor<1>, TrainError> {
        let x = binarize(&self.train, indices, rng, &self.device);
        let labels: Vec<usize> = indices
            .iter()
            .map(|&i| usize::from(self.train.labels[i]))
            .collect();
        let scores = self.net.classifier.forward(x.clone());
        let y = one_hot(&labels, CLASSES, &scores);
        let classification = if self.spec.estimator == Estimator::Sparsemax {
            mappings::sparsemax_loss(scores, &labels)?
        } else {
            let pairs: Vec<(usize, usize)> = labels.iter().copied().enumerate().collect();
            pick(log_softmax(scores, 1), &pairs).neg()
        };
        Ok(self.net.neg_elbo(x, y, rng).add(classification).mean())
    }

    /// The estimator's step on unlabelled images `x` with classifier scores `scores`: the
    /// decoder call is the VAE's `-ELBO(x, y)` for each (example, label) pair it asks for.
    fn unsupervised(
        &mut self,
        x: Tensor<2>,
        scores: Tensor<2>,
        rng: &mut EpochRng,
    ) -> Result<Step, TrainError> {
        let n = x.dims()[0];
        let baseline = self
            .net
            .baseline
            .as_ref()
            .map(|b| b.forward(x.clone()).reshape([n]));
        let (net, device, noise) = (&self.net, &self.device, &mut rng.noise);
        let mut decoder = |examples: &[usize], y: Tensor<2>| {
            net.neg_elbo(x.clone().select(0, row_index(examples, device)), y, noise)
        };
        Ok(self
            .estimator
            .step(scores, baseline, &mut decoder, &mut rng.latent)?)
    }

    fn apply(&mut self, objective: Tensor<1>) {
        let grads = GradientsParams::from_grads(objective.backward(), &self.net);
        self.net = self.optim.step(self.spec.hyper.lr, self.net.clone(), grads);
    }
}

/// Adam with L2 weight decay (reference §7.4).
pub(crate) fn optimizer(spec: &TrialSpec) -> ModuleOptimizer {
    let wd = spec.hyper.weight_decay;
    AdamConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay((wd > 0.0).then(|| WeightDecayConfig::new(wd as f32)))
        .init()
}

/// Dynamic binarization: pixel `v` becomes 1 with probability `v / 255`.
fn binarize(set: &ImageSet, indices: &[usize], rng: &mut ChaCha8Rng, device: &Device) -> Tensor<2> {
    let mut rows = Vec::with_capacity(indices.len() * IMAGE_PIXELS);
    for &i in indices {
        for &p in set.image(i) {
            rows.push(f32::from(u8::from(
                rng.random::<f32>() * 255.0 < f32::from(p),
            )));
        }
    }
    Tensor::from_data(TensorData::new(rows, [indices.len(), IMAGE_PIXELS]), device)
}

/// The `[n]` index tensor of `rows`.
pub(crate) fn row_index(rows: &[usize], device: &Device) -> Tensor<1, Int> {
    let rows: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    let n = rows.len();
    Tensor::from_data(TensorData::new(rows, [n]), device)
}

/// Serializes a module and an optimizer.
pub(crate) fn save<M: Module>(
    net: &M,
    optim: &ModuleOptimizer,
    estimator: &dyn LatentEstimator,
) -> Result<ModelState, TrainError> {
    let fail = |e: burn::store::RecordError| TrainError::Checkpoint {
        path: "(in memory)".into(),
        reason: format!("{e:?}"),
    };
    let parameters = net.clone().into_record().into_bytes().map_err(fail)?;
    let optimizer = optim.into_bytes().map_err(fail)?;
    Ok(ModelState {
        parameters: parameters.to_vec(),
        optimizer: optimizer.to_vec(),
        estimator: estimator.state(),
    })
}

/// Applies a serialized module and optimizer.
pub(crate) fn load<M: Module>(
    net: M,
    optim: ModuleOptimizer,
    state: &ModelState,
) -> Result<(M, ModuleOptimizer), TrainError> {
    let fail = |e: burn::store::RecordError| TrainError::Checkpoint {
        path: "(in memory)".into(),
        reason: format!("the saved parameters do not fit this model: {e:?}"),
    };
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(state.parameters.clone()));
    let net = net.try_load_record(record.map_err(fail)?).map_err(fail)?;
    let optim = optim
        .from_bytes(Bytes::from_bytes_vec(state.optimizer.clone()))
        .map_err(fail)?;
    Ok((net, optim))
}

/// Copies the parameters `bytes` holds into `net` where the paths match.
pub(crate) fn load_matching<M: Module>(net: M, bytes: &[u8]) -> Result<M, TrainError> {
    let fail = |e: burn::store::RecordError| TrainError::Checkpoint {
        path: "(warm start)".into(),
        reason: format!("the parameters do not fit this model: {e:?}"),
    };
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes.to_vec())).map_err(fail)?;
    net.try_load_record(record.allow_partial(true).allow_unused(true))
        .map_err(fail)
}

impl TaskModel for Ssvae {
    fn plan(&self) -> Vec<StagePlan> {
        let h = &self.spec.hyper;
        vec![
            StagePlan {
                stage: Stage::WarmStart,
                epochs: h.warm_start_epochs.unwrap_or(0),
                steps_per_epoch: super::batches(self.labeled.len(), h.batch_size),
            },
            StagePlan {
                stage: Stage::Main,
                epochs: h.epochs,
                steps_per_epoch: super::batches(self.unlabeled.len(), h.batch_size),
            },
        ]
    }

    fn train_step(
        &mut self,
        stage: Stage,
        index: usize,
        rng: &mut EpochRng,
    ) -> Result<StepOutcome, TrainError> {
        let batch = self.spec.hyper.batch_size;
        if index == 0 {
            let n = match stage {
                Stage::WarmStart => self.labeled.len(),
                Stage::Main => self.unlabeled.len(),
            };
            self.order = (0..n).collect();
            self.order.shuffle(&mut rng.latent);
            if stage == Stage::Main && self.estimator.state().global_step == 0 {
                // The semi-supervised stage starts from the warm-start weights with a fresh
                // optimizer, as the original loads only the weights.
                self.optim = optimizer(&self.spec);
            }
        }
        let positions = super::batch_of(&self.order, batch, index).to_vec();
        let labeled: Vec<usize> = positions
            .iter()
            .map(|&i| self.labeled[i % self.labeled.len()])
            .collect();
        let supervised = self.supervised(&labeled, &mut rng.noise)?;
        if stage == Stage::WarmStart {
            let objective = super::read_scalar(supervised.clone())?;
            self.apply(supervised);
            return Ok(StepOutcome {
                objective,
                decoder_calls: 0,
                examples: 0,
            });
        }

        let unlabeled: Vec<usize> = positions.iter().map(|&i| self.unlabeled[i]).collect();
        let x = binarize(&self.train, &unlabeled, &mut rng.noise, &self.device);
        let n = unlabeled.len();
        let scores = self.net.classifier.forward(x.clone());
        let step = self.unsupervised(x, scores, rng)?;
        let value = super::read_scalar(supervised.clone())? + UNSUPERVISED_WEIGHT * step.loss;
        self.apply(supervised.add(step.surrogate.mul_scalar(UNSUPERVISED_WEIGHT)));
        Ok(StepOutcome {
            objective: value,
            decoder_calls: step.decoder_calls,
            examples: n,
        })
    }

    fn evaluate(&mut self, rng: &mut EpochRng) -> Result<Metrics, TrainError> {
        let limit = self
            .spec
            .hyper
            .test_limit
            .unwrap_or(usize::MAX)
            .min(self.test.len());
        let batch = self.spec.hyper.batch_size;
        self.estimator.set_training(false);
        let (mut correct, mut elbo_sum) = (0usize, 0.0);
        let order: Vec<usize> = (0..limit).collect();
        let result = (|| {
            for chunk in order.chunks(batch) {
                let x = binarize(&self.test, chunk, &mut rng.noise, &self.device);
                let n = chunk.len();
                let scores = self.net.classifier.forward(x.clone());
                let predicted = read_f32(&scores)?;
                for (row, &i) in predicted.chunks(CLASSES).zip(chunk) {
                    let best = crate::estimators::gumbel::argmax(row);
                    correct += usize::from(best == usize::from(self.test.labels[i]));
                }
                let step = self.unsupervised(x, scores, rng)?;
                elbo_sum += step.loss * n as f64;
            }
            Ok::<(), TrainError>(())
        })();
        self.estimator.set_training(true);
        result?;
        let mut metrics = Metrics::new();
        metrics.insert("test_accuracy".into(), correct as f64 / limit as f64);
        metrics.insert("test_neg_elbo".into(), elbo_sum / limit as f64);
        Ok(metrics)
    }

    super::checkpointed_methods!();
}
