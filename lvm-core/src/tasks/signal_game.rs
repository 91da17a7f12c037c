//! The signalling game (reference §8): a sender sees the target image and emits one of 256
//! messages; a receiver sees the message and 16 images and picks one. The message is the
//! discrete latent, the receiver is the decoder, and `ℓ = -log p_recv(target)`. For SFE and
//! SFE+ the receiver samples its choice and both agents learn from the 0/1 reward by
//! REINFORCE (the paper's `loss_type acc`).
//!
//! An epoch is 100 batches of 64 freshly sampled games; the test set is 9,984 games drawn
//! once from a fixed seed, receiver permutations included (the original's test games change
//! between evaluations, reference §11 O8).
//!
//! A decoder call for a one-hot message is a gather: with `R` the receiver's image embeddings
//! and `E` the message embeddings, the logits of message `c` over a game's images are column
//! `c` of `R Eᵀ`, computed once per batch. Relaxed (Gumbel) messages go through `E` densely.

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::activation::{log_softmax, sigmoid};
use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::layers::{Mlp, linear, normal, uniform};
use super::ssvae::{optimizer, row_index};
use super::{EpochRng, Metrics, ModelState, Stage, StagePlan, StepOutcome, TaskModel, TrainError};
use crate::data::DataDir;
use crate::data::signal_game::{Game, GameImages, Split};
use crate::estimators::gumbel::argmax;
use crate::estimators::latent::{LatentEstimator, for_spec};
use crate::estimators::score_function::sample;
use crate::estimators::{Step, pick};
use crate::mappings::autodiff::read_f32;
use crate::spec::{Estimator, TrialSpec};

/// Messages (the vocabulary).
pub const VOCABULARY: usize = 256;
/// Images per game in the paper.
pub const GAME_SIZE: usize = 16;
/// Embedding size.
const EMBEDDING: usize = 256;
/// Sender hidden channels.
const HIDDEN: usize = 512;
/// The sender's score temperature `τ_s`.
const SENDER_TAU: f64 = 10.0;
/// Batches per epoch.
pub const STEPS_PER_EPOCH: usize = 100;
/// Games in the test set: 156 batches of 64.
pub const TEST_GAMES: usize = 9984;
/// The fixed seed of the test games.
const TEST_SEED: u64 = 20200725;

/// The sender, the receiver and NVIL's baseline network.
#[derive(Module, Debug)]
pub struct GameNet {
    /// Sender image embedding, `d → 256`, no bias.
    pub sender_embed: Linear,
    /// Sender 1×1 convolution weights `w_c`, one per hidden channel.
    pub sender_gate: Param<Tensor<1>>,
    /// Sender `H×1` convolution weights `v_c`.
    pub sender_mix: Param<Tensor<1>>,
    /// Sender output, `256 → 256`, no bias.
    pub sender_out: Linear,
    /// Receiver image embedding, `d → 256`, no bias.
    pub receiver_embed: Linear,
    /// Message embeddings `[256, 256]`: a row per message.
    pub messages: Param<Tensor<2>>,
    /// NVIL's baseline `b_ψ(x_target)`: `d → 512 → 512 → 512 → 1`.
    pub baseline: Option<Mlp>,
}

impl GameNet {
    /// Fresh networks for `dim`-dimensional image features.
    pub fn new(dim: usize, estimator: Estimator, rng: &mut ChaCha8Rng, device: &Device) -> Self {
        let sender_embed = linear(dim, EMBEDDING, false, rng, device);
        // The 1×1 convolution has fan-in 1, so U(-1, 1). The H×1 convolution has fan-in H,
        // so U(±1/√H); reference §10's U(-1, 1) for it saturates the output sigmoid
        // (docs/deviations.md).
        let gate = uniform(1, HIDDEN, 1.0, rng, device).reshape([HIDDEN]);
        let mix = uniform(1, HIDDEN, 1.0 / (HIDDEN as f64).sqrt(), rng, device).reshape([HIDDEN]);
        let sender_out = linear(EMBEDDING, VOCABULARY, false, rng, device);
        let receiver_embed = linear(dim, EMBEDDING, false, rng, device);
        // An embedding table N(0, 1); Gumbel's linear layer U(±1/√256) (reference §8.2).
        let messages = if estimator.is_gumbel() {
            uniform(
                VOCABULARY,
                EMBEDDING,
                1.0 / (VOCABULARY as f64).sqrt(),
                rng,
                device,
            )
        } else {
            normal(VOCABULARY, EMBEDDING, rng, device)
        };
        let baseline =
            (estimator == Estimator::Nvil).then(|| Mlp::new(&[dim, 512, 512, 512, 1], rng, device));
        Self {
            sender_embed,
            sender_gate: Param::from_tensor(gate),
            sender_mix: Param::from_tensor(mix),
            sender_out,
            receiver_embed,
            messages: Param::from_tensor(messages),
            baseline,
        }
    }

    /// The sender's message scores `[B, 256]` for target images `[B, d]`.
    pub fn sender(&self, target: Tensor<2>) -> Tensor<2> {
        let batch = target.dims()[0];
        let e = self
            .sender_embed
            .forward(target)
            .reshape([batch, 1, EMBEDDING]);
        let gate = self.sender_gate.val().reshape([1, HIDDEN, 1]);
        let h = sigmoid(e.mul(gate));
        let mix = self.sender_mix.val().reshape([1, HIDDEN, 1]);
        let u = sigmoid(h.mul(mix).sum_dim(1)).reshape([batch, EMBEDDING]);
        self.sender_out.forward(u).div_scalar(SENDER_TAU)
    }
}

/// One batch of games as tensors.
struct Batch {
    /// Target features `[B, d]`.
    target: Tensor<2>,
    /// Receiver image embeddings `[B·16, 256]`.
    receiver: Tensor<2>,
    /// The receiver position of the target, per game.
    answers: Vec<usize>,
    /// Images per game.
    size: usize,
}

/// The signalling-game task.
pub struct SignalGame {
    spec: TrialSpec,
    net: GameNet,
    optim: ModuleOptimizer,
    estimator: Box<dyn LatentEstimator>,
    device: Device,
    train: GameImages,
    test: GameImages,
    test_games: Vec<Game>,
    /// Whether the receiver samples its choice (SFE and SFE+).
    sampled_receiver: bool,
}

impl SignalGame {
    /// The default game data (MNIST digits and Fashion-MNIST classes) and fresh networks.
    pub fn new(spec: &TrialSpec, data: &DataDir, device: &Device) -> Result<Self, TrainError> {
        let train = GameImages::default_split(data, Split::Train, None)?;
        let test = GameImages::default_split(data, Split::Test, None)?;
        Self::with_images(spec, train, test, device)
    }

    /// The game on features of the user's own: `dir` holds `train_features.npy` and
    /// `test_features.npy` (float32 `[N, d]`, one row per image, L2-normalized on load) and
    /// `train_labels.npy` and `test_labels.npy` (integer concept labels, length `N`).
    pub fn from_features(
        spec: &TrialSpec,
        dir: &Path,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let load = |split: &str| {
            GameImages::from_npy(
                &dir.join(format!("{split}_features.npy")),
                &dir.join(format!("{split}_labels.npy")),
            )
        };
        let (train, test) = (load("train")?, load("test")?);
        if train.dim() != test.dim() {
            return Err(TrainError::Data(crate::data::DataError::Shape {
                file: dir.join("test_features.npy"),
                detail: format!(
                    "test features have {} columns, train features {}",
                    test.dim(),
                    train.dim()
                ),
            }));
        }
        Self::with_images(spec, train, test, device)
    }

    /// The game on given train and test images.
    pub fn with_images(
        spec: &TrialSpec,
        train: GameImages,
        test: GameImages,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let net = GameNet::new(train.dim(), spec.estimator, &mut rng, device);
        let games = spec.hyper.test_limit.unwrap_or(TEST_GAMES).min(TEST_GAMES);
        // Test games have the trial's size too; a size the images cannot fill is refused here.
        let size = spec.hyper.game_size.unwrap_or(GAME_SIZE);
        let test_games = test.sample(games, size, &mut ChaCha8Rng::seed_from_u64(TEST_SEED))?;
        train.sample(1, size, &mut rng)?;
        Ok(Self {
            spec: spec.clone(),
            net,
            optim: optimizer(spec),
            estimator: for_spec(spec),
            device: device.clone(),
            train,
            test,
            test_games,
            sampled_receiver: matches!(spec.estimator, Estimator::Sfe | Estimator::SfePlus),
        })
    }

    fn batch(net: &GameNet, device: &Device, images: &GameImages, games: &[Game]) -> Batch {
        let dim = images.dim();
        let mut target = Vec::with_capacity(games.len() * dim);
        let mut receiver = Vec::new();
        for game in games {
            target.extend_from_slice(images.feature(game.sender[0]));
            for &i in &game.receiver {
                receiver.extend_from_slice(images.feature(i));
            }
        }
        let b = games.len();
        let target = Tensor::from_data(TensorData::new(target, [b, dim]), device);
        let size = games.first().map_or(1, |g| g.receiver.len());
        let receiver = Tensor::from_data(TensorData::new(receiver, [b * size, dim]), device);
        Batch {
            target,
            receiver: net.receiver_embed.forward(receiver),
            answers: games.iter().map(|g| g.target).collect(),
            size,
        }
    }

    /// Runs the estimator on a batch; returns the step and the weighted success rate.
    fn play(&mut self, batch: &Batch, rng: &mut EpochRng) -> Result<(Step, f64), TrainError> {
        let n = batch.answers.len();
        let scores = self.net.sender(batch.target.clone());
        let baseline = self
            .net
            .baseline
            .as_ref()
            .map(|b| b.forward(batch.target.clone()).reshape([n]));
        let receiver = Receiver {
            net: &self.net,
            batch,
            one_hot: !self.spec.estimator.is_gumbel(),
            device: &self.device,
            sampled: self.sampled_receiver.then(|| Sampled {
                baseline: self.estimator.running_baseline(),
                entropy_coeff: self.spec.hyper.entropy_coeff,
            }),
        };
        let mut success = Vec::new();
        let noise = &mut rng.noise;
        let mut decoder = |examples: &[usize], latent: Tensor<2>| {
            receiver.decode(examples, latent, noise, &mut success)
        };
        let step = self
            .estimator
            .step(scores, baseline, &mut decoder, &mut rng.latent)?;
        let rate = step
            .weights
            .iter()
            .zip(&success)
            .map(|(&w, &s)| f64::from(w) * f64::from(s))
            .sum::<f64>()
            / n as f64;
        Ok((step, rate))
    }
}

/// The receiver's REINFORCE settings when it samples its choice.
struct Sampled {
    /// The sender's running-average baseline (SFE); `None` pairs each sample with the
    /// second sample of its game (SFE+).
    baseline: Option<f64>,
    entropy_coeff: f64,
}

/// The receiver as the estimators' decoder.
struct Receiver<'a> {
    net: &'a GameNet,
    batch: &'a Batch,
    /// Whether messages are exactly one-hot (every estimator but the Gumbel ones).
    one_hot: bool,
    device: &'a Device,
    sampled: Option<Sampled>,
}

impl Receiver<'_> {
    /// `ℓ` per (game, message) pair; pushes each pair's success (0/1) onto `success`.
    fn decode(
        &self,
        examples: &[usize],
        latent: Tensor<2>,
        rng: &mut ChaCha8Rng,
        success: &mut Vec<f32>,
    ) -> Tensor<1> {
        let n = examples.len();
        let (games, size) = (self.batch.answers.len(), self.batch.size);
        // Many one-hot pairs (marginalization): gather from the table of every (game,
        // message) pair's logits, R Eᵀ, built once. Few pairs or relaxed messages: embed each.
        let logits = if self.one_hot && n > 4 * games {
            let rows = read_f32(&latent).expect("messages are readable");
            let picked: Vec<usize> = examples
                .iter()
                .zip(rows.chunks(VOCABULARY))
                .map(|(&b, row)| b * VOCABULARY + argmax(row))
                .collect();
            self.batch
                .receiver
                .clone()
                .matmul(self.net.messages.val().transpose())
                .reshape([games, size, VOCABULARY])
                .swap_dims(1, 2)
                .reshape([games * VOCABULARY, size])
                .select(0, row_index(&picked, self.device))
        } else {
            let m = latent
                .matmul(self.net.messages.val())
                .reshape([n, EMBEDDING, 1]);
            let images = self
                .batch
                .receiver
                .clone()
                .reshape([games, size, EMBEDDING])
                .select(0, row_index(examples, self.device));
            images.matmul(m).reshape([n, size])
        };
        let log_p = log_softmax(logits, 1);
        let answers: Vec<(usize, usize)> = examples
            .iter()
            .enumerate()
            .map(|(i, &b)| (i, self.batch.answers[b]))
            .collect();
        let probs = read_f32(&log_p).expect("receiver log-probabilities are readable");
        let Some(sampled) = &self.sampled else {
            for (row, &(_, answer)) in probs.chunks(size).zip(&answers) {
                success.push(f32::from(u8::from(argmax(row) == answer)));
            }
            return pick(log_p, &answers).neg();
        };

        // The receiver samples a ~ ρ; ℓ = -1[a = target]. Its REINFORCE term rides on ℓ:
        // value ℓ, gradient (ℓ - b) ∇log ρ(a) - λ ∇H(ρ).
        let mut choices = Vec::with_capacity(n);
        let mut reward = Vec::with_capacity(n);
        for (row, &(i, answer)) in probs.chunks(size).zip(&answers) {
            let p: Vec<f32> = row.iter().map(|v| v.exp()).collect();
            let a = sample(&p, rng);
            choices.push((i, a));
            reward.push(f32::from(u8::from(a == answer)));
        }
        success.extend_from_slice(&reward);
        let loss: Vec<f32> = reward.iter().map(|r| -r).collect();
        let half = n / 2;
        let advantage: Vec<f32> = (0..n)
            .map(|i| {
                let b = match sampled.baseline {
                    Some(b) => b as f32,
                    None if n.is_multiple_of(2) => loss[if i < half { i + half } else { i - half }],
                    None => 0.0,
                };
                loss[i] - b
            })
            .collect();
        let tensor = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v, [n]), self.device);
        let log_choice = pick(log_p.clone(), &choices);
        let entropy = log_p.clone().exp().mul(log_p).sum_dim(1).neg().reshape([n]);
        let score = tensor(advantage).mul(log_choice.clone().sub(log_choice.detach()));
        let bonus = entropy
            .clone()
            .sub(entropy.detach())
            .mul_scalar(sampled.entropy_coeff);
        tensor(loss).add(score).sub(bonus)
    }
}

impl TaskModel for SignalGame {
    fn plan(&self) -> Vec<StagePlan> {
        vec![StagePlan {
            stage: Stage::Main,
            epochs: self.spec.hyper.epochs,
            steps_per_epoch: STEPS_PER_EPOCH,
        }]
    }

    fn train_step(
        &mut self,
        _stage: Stage,
        _index: usize,
        rng: &mut EpochRng,
    ) -> Result<StepOutcome, TrainError> {
        let b = self.spec.hyper.batch_size;
        let size = self.spec.hyper.game_size.unwrap_or(GAME_SIZE);
        let games = self.train.sample(b, size, &mut rng.latent)?;
        let batch = Self::batch(&self.net, &self.device, &self.train, &games);
        let (step, _) = self.play(&batch, rng)?;
        let objective = step.loss;
        let grads = GradientsParams::from_grads(step.surrogate.backward(), &self.net);
        self.net = self.optim.step(self.spec.hyper.lr, self.net.clone(), grads);
        Ok(StepOutcome {
            objective,
            decoder_calls: step.decoder_calls,
            examples: b,
        })
    }

    fn evaluate(&mut self, rng: &mut EpochRng) -> Result<Metrics, TrainError> {
        let b = self.spec.hyper.batch_size;
        self.estimator.set_training(false);
        let games = std::mem::take(&mut self.test_games);
        let mut totals = (0.0, 0.0);
        let mut result = Ok(());
        for chunk in games.chunks(b) {
            let batch = Self::batch(&self.net, &self.device, &self.test, chunk);
            match self.play(&batch, rng) {
                Ok((step, rate)) => {
                    totals.0 += step.loss * chunk.len() as f64;
                    totals.1 += rate * chunk.len() as f64;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.test_games = games;
        self.estimator.set_training(true);
        result?;
        let count = self.test_games.len().max(1) as f64;
        let mut metrics = Metrics::new();
        metrics.insert("test_loss".into(), totals.0 / count);
        metrics.insert("test_success".into(), totals.1 / count);
        Ok(metrics)
    }

    super::checkpointed_methods!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimators::one_hot;
    use crate::spec::Task;

    #[test]
    fn the_gathered_table_equals_the_dense_receiver() {
        // The one-hot shortcut (a gather from R Eᵀ) must give the dense path's losses
        // (message embedding, then a product with each game's images) for every pair.
        let device = Device::flex().autodiff();
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let net = GameNet::new(12, Estimator::Softmax, &mut rng, &device);
        let (b, dim) = (3, 12);
        let images: Vec<f32> = (0..b * GAME_SIZE * dim)
            .map(|i| ((i * 37) % 11) as f32 / 11.0)
            .collect();
        let receiver =
            Tensor::<2>::from_data(TensorData::new(images, [b * GAME_SIZE, dim]), &device);
        let batch = Batch {
            target: Tensor::zeros([b, dim], &device),
            receiver: net.receiver_embed.forward(receiver),
            answers: vec![3, 0, 15],
            size: GAME_SIZE,
        };
        // 13 pairs for 3 games: more than 4 per game, so the one-hot receiver gathers.
        let examples = [0, 2, 1, 2, 0, 1, 1, 0, 2, 2, 1, 0, 0];
        let messages = [5, 255, 0, 17, 5, 9, 200, 1, 2, 3, 4, 100, 101];
        let make = |one_hot: bool| Receiver {
            net: &net,
            batch: &batch,
            one_hot,
            device: &device,
            sampled: None,
        };
        let latent = one_hot(&messages, VOCABULARY, &batch.target);
        let (mut s1, mut s2) = (Vec::new(), Vec::new());
        let gathered = make(true).decode(&examples, latent.clone(), &mut rng, &mut s1);
        let dense = make(false).decode(&examples, latent, &mut rng, &mut s2);
        let (g, d) = (read_f32(&gathered).unwrap(), read_f32(&dense).unwrap());
        for (x, y) in g.iter().zip(&d) {
            assert!((x - y).abs() < 1e-4, "{g:?} vs {d:?}");
        }
        assert_eq!(s1, s2);
    }

    #[test]
    fn test_games_have_the_trial_s_size() {
        // 5 concepts of 3 images each, 4-dimensional features.
        let labels: Vec<i64> = (0..15).map(|i| i / 3).collect();
        let features: Vec<f32> = (0..15 * 4).map(|i| 1.0 + (i % 7) as f32).collect();
        let images = || GameImages::new(features.clone(), 4, &labels, Path::new("mem")).unwrap();
        let device = Device::flex().autodiff();
        let mut spec = TrialSpec::paper(Task::SignalGame, Estimator::Sfe, 1);
        spec.hyper.test_limit = Some(6);
        for size in [2, 5] {
            spec.hyper.game_size = Some(size);
            let game = SignalGame::with_images(&spec, images(), images(), &device).unwrap();
            assert_eq!(game.test_games.len(), 6);
            assert!(game.test_games.iter().all(|g| g.receiver.len() == size));
        }
        // 6 images per game cannot be filled from 5 concepts: refused when the game is built.
        spec.hyper.game_size = Some(6);
        let refused = SignalGame::with_images(&spec, images(), images(), &device);
        assert!(refused.is_err());
    }
}
