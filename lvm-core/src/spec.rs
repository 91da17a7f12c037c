//! `TrialSpec`: the serde description of one trial (task, estimator, seed, hyperparameters),
//! with the paper's defaults per (task, estimator) (reference §7.5, §8.5, §9.4) and the
//! validation that refuses impossible combinations before anything runs. The coordinator
//! stores and hashes these; the worker trains them.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The three tasks of the paper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Semi-supervised VAE on MNIST (categorical latent, K = 10).
    Ssvae,
    /// Signalling game with 16 images and 256 messages (categorical latent).
    SignalGame,
    /// Bit-vector VAE on Fashion-MNIST (D = 32 or 128 bits).
    Bitvec,
}

/// Every gradient estimator and marginalization the product trains with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Estimator {
    /// Score function with a running-average baseline.
    Sfe,
    /// Score function with a second sample as baseline.
    SfePlus,
    /// Score function with a learned input-dependent baseline.
    Nvil,
    /// Gumbel-Softmax (relaxed samples).
    Gumbel,
    /// Straight-through Gumbel.
    StGumbel,
    /// Sum&Sample (Rao-Blackwellized score function), categorical only.
    SumAndSample,
    /// Exact marginalization under softmax, categorical only.
    Softmax,
    /// Exact sparse marginalization under sparsemax, categorical only.
    Sparsemax,
    /// Top-k sparsemax over bit vectors.
    TopkSparsemax,
    /// SparseMAP over bit vectors.
    Sparsemap,
    /// SparseMAP over bit vectors with at most `budget` bits on.
    SparsemapBudget,
}

impl Task {
    /// Every task.
    pub const ALL: [Task; 3] = [Task::Ssvae, Task::SignalGame, Task::Bitvec];

    /// The estimators this task supports.
    pub fn estimators(self) -> &'static [Estimator] {
        use Estimator::*;
        match self {
            Task::Ssvae | Task::SignalGame => &[
                Sfe,
                SfePlus,
                Nvil,
                Gumbel,
                StGumbel,
                SumAndSample,
                Softmax,
                Sparsemax,
            ],
            Task::Bitvec => &[
                Sfe,
                SfePlus,
                Nvil,
                Gumbel,
                StGumbel,
                TopkSparsemax,
                Sparsemap,
                SparsemapBudget,
            ],
        }
    }

    /// The name used in files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Task::Ssvae => "ssvae",
            Task::SignalGame => "signal_game",
            Task::Bitvec => "bitvec",
        }
    }
}

impl Estimator {
    /// Every estimator.
    pub const ALL: [Estimator; 11] = [
        Estimator::Sfe,
        Estimator::SfePlus,
        Estimator::Nvil,
        Estimator::Gumbel,
        Estimator::StGumbel,
        Estimator::SumAndSample,
        Estimator::Softmax,
        Estimator::Sparsemax,
        Estimator::TopkSparsemax,
        Estimator::Sparsemap,
        Estimator::SparsemapBudget,
    ];

    /// The name used in files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Estimator::Sfe => "sfe",
            Estimator::SfePlus => "sfe_plus",
            Estimator::Nvil => "nvil",
            Estimator::Gumbel => "gumbel",
            Estimator::StGumbel => "st_gumbel",
            Estimator::SumAndSample => "sum_and_sample",
            Estimator::Softmax => "softmax",
            Estimator::Sparsemax => "sparsemax",
            Estimator::TopkSparsemax => "topk_sparsemax",
            Estimator::Sparsemap => "sparsemap",
            Estimator::SparsemapBudget => "sparsemap_budget",
        }
    }

    /// Whether it uses a Gumbel temperature schedule.
    pub fn is_gumbel(self) -> bool {
        matches!(self, Estimator::Gumbel | Estimator::StGumbel)
    }
}

/// A name that is not a task or estimator; the message lists the valid names.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("unknown {kind} '{name}' (valid: {valid})")]
pub struct UnknownName {
    /// "task" or "estimator".
    pub kind: &'static str,
    /// The name given.
    pub name: String,
    /// The valid names, comma-separated.
    pub valid: String,
}

impl std::str::FromStr for Task {
    type Err = UnknownName;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| UnknownName {
                kind: "task",
                name: name.into(),
                valid: Task::ALL.map(Task::name).join(", "),
            })
    }
}

impl std::str::FromStr for Estimator {
    type Err = UnknownName;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Estimator::ALL
            .into_iter()
            .find(|e| e.name() == name)
            .ok_or_else(|| UnknownName {
                kind: "estimator",
                name: name.into(),
                valid: Estimator::ALL.map(Estimator::name).join(", "),
            })
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for Estimator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The Gumbel temperature schedule (reference §3.4): every `update_every` steps,
/// `τ = max(min_tau, exp(-decay · step))`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Temperature {
    /// Rate `r` of `exp(-r t)`.
    pub decay: f64,
    /// Steps between updates `F`.
    pub update_every: u64,
    /// Floor of the schedule (0.5 in the original).
    pub min_tau: f64,
}

/// Hyperparameters of one trial. Fields that a task or estimator does not use are `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hyperparameters {
    /// Adam learning rate.
    pub lr: f64,
    /// Examples (or games) per optimizer step.
    pub batch_size: usize,
    /// Epochs of the main stage.
    pub epochs: usize,
    /// Cap on optimizer steps of the main stage (`None`: the epochs decide).
    pub steps: Option<u64>,
    /// L2 weight decay added to the gradient (not decoupled).
    pub weight_decay: f64,
    /// Entropy bonus λ on the encoder.
    pub entropy_coeff: f64,
    /// Gumbel temperature schedule (Gumbel estimators only).
    pub temperature: Option<Temperature>,
    /// Bits D of the bit-vector latent (bitvec only).
    pub bits: Option<usize>,
    /// SparseMAP budget B (sparsemap_budget only).
    pub budget: Option<usize>,
    /// k of top-k sparsemax or of Sum&Sample.
    pub k: Option<usize>,
    /// Labelled-only warm-start epochs (ssvae only).
    pub warm_start_epochs: Option<usize>,
    /// Importance samples for the test NLL (bitvec only; a multiple of 16).
    pub importance_samples: Option<usize>,
    /// Evaluate on the first N test examples only (`None`: all).
    pub test_limit: Option<usize>,
    /// Images per signalling game, target included (signal_game only; the paper uses 16).
    #[serde(default)]
    pub game_size: Option<usize>,
}

/// One trial: what to train, how, and with which seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrialSpec {
    /// The task.
    pub task: Task,
    /// The estimator.
    pub estimator: Estimator,
    /// The seed of every random choice in the trial.
    pub seed: u64,
    /// Hyperparameters.
    pub hyper: Hyperparameters,
}

/// Why a trial spec cannot run.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SpecError {
    /// The estimator does not apply to the task.
    #[error("estimator '{estimator}' does not apply to task '{task}' (valid: {valid})")]
    EstimatorForTask {
        /// The task.
        task: Task,
        /// The estimator.
        estimator: Estimator,
        /// The valid estimators, comma-separated.
        valid: String,
    },
    /// A hyperparameter has an impossible value.
    #[error("{name} = {value} is invalid ({expected})")]
    Value {
        /// The hyperparameter.
        name: &'static str,
        /// Its value, as written.
        value: String,
        /// What would be valid.
        expected: String,
    },
    /// A hyperparameter was given where it has no meaning.
    #[error("{name} does not apply to {task} with {estimator}")]
    NotApplicable {
        /// The hyperparameter.
        name: &'static str,
        /// The task.
        task: Task,
        /// The estimator.
        estimator: Estimator,
    },
}

/// The paper's learning rate for a (task, estimator, bits) triple (reference §7.5, §8.5, §9.4).
fn paper_lr(task: Task, estimator: Estimator, bits: usize) -> f64 {
    use Estimator::*;
    match (task, estimator) {
        (Task::Ssvae, Sfe | SfePlus) => 1e-4,
        (Task::Ssvae, Sparsemax) => 5e-4,
        (Task::Ssvae, _) => 1e-3,
        (Task::SignalGame, Sparsemax | SumAndSample) => 5e-3,
        (Task::SignalGame, _) => 1e-3,
        (Task::Bitvec, Nvil | StGumbel) if bits == 128 => 5e-4,
        (Task::Bitvec, TopkSparsemax) if bits == 32 => 2e-3,
        (Task::Bitvec, Sparsemap | SparsemapBudget) => 2e-3,
        (Task::Bitvec, _) => 1e-3,
    }
}

/// The paper's signalling-game entropy coefficient (reference §8.5); VAE tasks use λ = 1. The
/// game's SFE and SFE+ values (0.01, 0.05) are those of the paper's `loss_type acc` runs,
/// where the receiver also samples its choice; the game task must train them that way.
fn paper_entropy(task: Task, estimator: Estimator) -> f64 {
    use Estimator::*;
    match (task, estimator) {
        (Task::SignalGame, Sfe | Gumbel | StGumbel | SumAndSample) => 0.01,
        (Task::SignalGame, SfePlus) => 0.05,
        (Task::SignalGame, _) => 0.1,
        _ => 1.0,
    }
}

impl TrialSpec {
    /// A trial with the paper's hyperparameters for this (task, estimator); bit-vector trials
    /// use D = 32 (call [`TrialSpec::with_bits`] for 128).
    pub fn paper(task: Task, estimator: Estimator, seed: u64) -> Self {
        let bits = 32;
        let gumbel_decay = if task == Task::Ssvae { 1e-4 } else { 1e-5 };
        let hyper = Hyperparameters {
            lr: paper_lr(task, estimator, bits),
            batch_size: 64,
            epochs: match (task, estimator) {
                (Task::Ssvae, _) => 200,
                (Task::SignalGame, Estimator::SumAndSample) => 200,
                (Task::SignalGame, _) => 500,
                (Task::Bitvec, _) => 100,
            },
            steps: None,
            weight_decay: if task == Task::Ssvae { 1e-5 } else { 0.0 },
            entropy_coeff: paper_entropy(task, estimator),
            temperature: estimator.is_gumbel().then_some(Temperature {
                decay: gumbel_decay,
                update_every: 1000,
                min_tau: 0.5,
            }),
            bits: (task == Task::Bitvec).then_some(bits),
            budget: (estimator == Estimator::SparsemapBudget).then_some(bits / 2),
            k: match estimator {
                Estimator::TopkSparsemax => Some(10),
                Estimator::SumAndSample => Some(1),
                _ => None,
            },
            warm_start_epochs: (task == Task::Ssvae).then_some(100),
            importance_samples: (task == Task::Bitvec).then_some(1024),
            test_limit: None,
            game_size: (task == Task::SignalGame).then_some(16),
        };
        Self {
            task,
            estimator,
            seed,
            hyper,
        }
    }

    /// The paper's settings at `bits` bits (bit-vector task): learning rate, batch size,
    /// budget and Gumbel decay as in reference §9.4.
    pub fn with_bits(mut self, bits: usize) -> Self {
        use Estimator::*;
        self.hyper.bits = Some(bits);
        self.hyper.lr = paper_lr(self.task, self.estimator, bits);
        let big_sparsemap = bits == 128 && matches!(self.estimator, Sparsemap | SparsemapBudget);
        self.hyper.batch_size = if big_sparsemap { 16 } else { 64 };
        if self.estimator == SparsemapBudget {
            self.hyper.budget = Some(bits / 2);
        }
        if let Some(t) = self.hyper.temperature.as_mut() {
            t.decay = if bits == 128 && self.estimator == Gumbel {
                1e-4
            } else {
                1e-5
            };
        }
        self
    }

    /// Checks the combination and every value; the error names the first problem.
    pub fn validate(&self) -> Result<(), SpecError> {
        let (task, estimator, h) = (self.task, self.estimator, &self.hyper);
        if !task.estimators().contains(&estimator) {
            let valid = task
                .estimators()
                .iter()
                .map(|e| e.name())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(SpecError::EstimatorForTask {
                task,
                estimator,
                valid,
            });
        }
        let value = |name, value: String, expected: &str| {
            Err(SpecError::Value {
                name,
                value,
                expected: expected.into(),
            })
        };
        let not_applicable = |name| {
            Err(SpecError::NotApplicable {
                name,
                task,
                estimator,
            })
        };

        if !(h.lr.is_finite() && h.lr > 0.0 && h.lr <= 1.0) {
            return value("lr", h.lr.to_string(), "expected 0 < lr <= 1");
        }
        if h.batch_size == 0 || h.batch_size > 1 << 16 {
            return value("batch_size", h.batch_size.to_string(), "expected 1..=65536");
        }
        if h.epochs == 0 {
            return value("epochs", "0".into(), "expected at least 1");
        }
        if h.steps == Some(0) {
            return value("steps", "0".into(), "expected at least 1, or no cap");
        }
        if !(h.weight_decay.is_finite() && h.weight_decay >= 0.0) {
            return value("weight_decay", h.weight_decay.to_string(), "expected >= 0");
        }
        if !(h.entropy_coeff.is_finite() && h.entropy_coeff >= 0.0) {
            return value(
                "entropy_coeff",
                h.entropy_coeff.to_string(),
                "expected >= 0",
            );
        }
        match (&h.temperature, estimator.is_gumbel()) {
            (Some(t), true) => {
                if !(t.decay.is_finite() && t.decay >= 0.0) || t.update_every == 0 {
                    let shown = format!("decay {} every {}", t.decay, t.update_every);
                    return value(
                        "temperature",
                        shown,
                        "expected decay >= 0, update_every >= 1",
                    );
                }
                if !(t.min_tau.is_finite() && t.min_tau > 0.0 && t.min_tau <= 1.0) {
                    return value(
                        "temperature.min_tau",
                        t.min_tau.to_string(),
                        "expected (0, 1]",
                    );
                }
            }
            (None, true) => return value("temperature", "none".into(), "Gumbel needs a schedule"),
            (Some(_), false) => return not_applicable("temperature"),
            (None, false) => {}
        }
        self.validate_latent()?;
        match (h.warm_start_epochs, task) {
            (Some(_), Task::Ssvae) | (None, _) => {}
            (Some(_), _) => return not_applicable("warm_start_epochs"),
        }
        match (h.importance_samples, task) {
            (Some(n), Task::Bitvec) if n == 0 || n % 16 != 0 || n > 1 << 16 => {
                return value(
                    "importance_samples",
                    n.to_string(),
                    "expected a positive multiple of 16, at most 65536",
                );
            }
            (Some(_), Task::Bitvec) | (None, _) => {}
            (Some(_), _) => return not_applicable("importance_samples"),
        }
        if h.test_limit == Some(0) {
            return value("test_limit", "0".into(), "expected at least 1, or no limit");
        }
        match (h.game_size, task) {
            (Some(n), Task::SignalGame) if !(2..=256).contains(&n) => {
                let expected = "expected 2 to 256 images, at most the number of concepts";
                return value("game_size", n.to_string(), expected);
            }
            (Some(_), Task::SignalGame) | (None, _) => {}
            (Some(_), _) => return not_applicable("game_size"),
        }
        Ok(())
    }

    /// Bits, budget and k against the task and estimator.
    fn validate_latent(&self) -> Result<(), SpecError> {
        let (task, estimator, h) = (self.task, self.estimator, &self.hyper);
        let value = |name, value: String, expected: String| {
            Err(SpecError::Value {
                name,
                value,
                expected,
            })
        };
        let not_applicable = |name| {
            Err(SpecError::NotApplicable {
                name,
                task,
                estimator,
            })
        };
        let bits = match (h.bits, task) {
            (Some(d), Task::Bitvec) if (1..=512).contains(&d) => d,
            (Some(d), Task::Bitvec) => {
                return value("bits", d.to_string(), "expected 1..=512".into());
            }
            (None, Task::Bitvec) => {
                return value("bits", "none".into(), "bitvec needs bits".into());
            }
            (Some(_), _) => return not_applicable("bits"),
            (None, _) => 0,
        };
        match (h.budget, estimator) {
            (Some(b), Estimator::SparsemapBudget) if b == 0 || b > bits => {
                return value(
                    "budget",
                    b.to_string(),
                    format!("expected 1..={bits} (the bit count)"),
                );
            }
            (Some(_), Estimator::SparsemapBudget) => {}
            (None, Estimator::SparsemapBudget) => {
                return value(
                    "budget",
                    "none".into(),
                    "sparsemap_budget needs a budget".into(),
                );
            }
            (Some(_), _) => return not_applicable("budget"),
            (None, _) => {}
        }
        match (h.k, estimator) {
            (Some(0), _) => value("k", "0".into(), "expected k >= 1".into()),
            (Some(k), Estimator::TopkSparsemax) if bits < 64 && k as u128 > 1u128 << bits => {
                value("k", k.to_string(), format!("expected k <= 2^{bits}"))
            }
            (Some(k), Estimator::SumAndSample) if k > 10 && task == Task::Ssvae => {
                value("k", k.to_string(), "expected k <= 10 (the classes)".into())
            }
            (Some(k), Estimator::SumAndSample) if k > 256 => value(
                "k",
                k.to_string(),
                "expected k <= 256 (the messages)".into(),
            ),
            (Some(k), Estimator::TopkSparsemax) if k > 1 << 16 => {
                value("k", k.to_string(), "expected k <= 65536".into())
            }
            (Some(_), Estimator::TopkSparsemax | Estimator::SumAndSample) => Ok(()),
            (None, Estimator::TopkSparsemax | Estimator::SumAndSample) => {
                value("k", "none".into(), format!("{estimator} needs k"))
            }
            (Some(_), _) => not_applicable("k"),
            (None, _) => Ok(()),
        }
    }

    /// The canonical JSON of the spec: fields in a fixed order, no whitespace. Equal specs
    /// give equal bytes, so a hash of it identifies the trial.
    pub fn canonical_json(&self) -> String {
        serde_json::to_string(self).expect("a TrialSpec always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_paper_default_is_valid() {
        for task in Task::ALL {
            for &estimator in task.estimators() {
                for bits in [32, 128] {
                    let mut spec = TrialSpec::paper(task, estimator, 42);
                    if task == Task::Bitvec {
                        spec = spec.with_bits(bits);
                    }
                    assert_eq!(spec.validate(), Ok(()), "{task} {estimator} {bits}");
                }
            }
        }
    }

    #[test]
    fn paper_values_match_the_reference_tables() {
        use Estimator::*;
        // §7.5: SSVAE SFE 1e-4, sparsemax 5e-4, weight decay 1e-5, 100 warm-start epochs.
        let s = TrialSpec::paper(Task::Ssvae, Sfe, 43);
        assert_eq!(
            (s.hyper.lr, s.hyper.weight_decay, s.hyper.warm_start_epochs),
            (1e-4, 1e-5, Some(100))
        );
        assert_eq!(TrialSpec::paper(Task::Ssvae, Sparsemax, 43).hyper.lr, 5e-4);
        // §8.5: game sparsemax lr 5e-3 and λ 0.1; SFE+ λ 0.05; Sum&Sample 200 epochs.
        let s = TrialSpec::paper(Task::SignalGame, Sparsemax, 322);
        assert_eq!((s.hyper.lr, s.hyper.entropy_coeff), (5e-3, 0.1));
        assert_eq!(
            TrialSpec::paper(Task::SignalGame, SfePlus, 322)
                .hyper
                .entropy_coeff,
            0.05
        );
        assert_eq!(
            TrialSpec::paper(Task::SignalGame, SumAndSample, 984)
                .hyper
                .epochs,
            200
        );
        // §9.4: D=128 SparseMAP batch 16 budget 64; D=128 Gumbel decay 1e-4, ST 1e-5, lr 5e-4.
        let s = TrialSpec::paper(Task::Bitvec, SparsemapBudget, 42).with_bits(128);
        assert_eq!(
            (s.hyper.batch_size, s.hyper.budget, s.hyper.lr),
            (16, Some(64), 2e-3)
        );
        let g = TrialSpec::paper(Task::Bitvec, Gumbel, 42).with_bits(128);
        assert_eq!(g.hyper.temperature.unwrap().decay, 1e-4);
        let back = TrialSpec::paper(Task::Bitvec, Sparsemap, 42)
            .with_bits(128)
            .with_bits(32);
        assert_eq!(
            back,
            TrialSpec::paper(Task::Bitvec, Sparsemap, 42),
            "with_bits resets"
        );
        let st = TrialSpec::paper(Task::Bitvec, StGumbel, 42).with_bits(128);
        assert_eq!(
            (st.hyper.temperature.unwrap().decay, st.hyper.lr),
            (1e-5, 5e-4)
        );
        assert_eq!(
            TrialSpec::paper(Task::Bitvec, TopkSparsemax, 42).hyper.lr,
            2e-3
        );
    }

    #[test]
    fn impossible_combinations_are_refused_with_the_valid_values() {
        let err = TrialSpec::paper(Task::Ssvae, Estimator::Sparsemap, 1)
            .validate()
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("'sparsemap'") && text.contains("'ssvae'"),
            "{text}"
        );
        assert!(
            text.contains("sparsemax") && text.contains("sum_and_sample"),
            "{text}"
        );

        let mut s = TrialSpec::paper(Task::Bitvec, Estimator::SparsemapBudget, 1);
        s.hyper.budget = Some(33);
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("budget = 33")
        );
        let mut s = TrialSpec::paper(Task::Bitvec, Estimator::TopkSparsemax, 1);
        s.hyper.k = Some(0);
        assert!(s.validate().unwrap_err().to_string().contains("k = 0"));
        let mut s = TrialSpec::paper(Task::Ssvae, Estimator::Sfe, 1);
        s.hyper.lr = -1.0;
        assert!(s.validate().unwrap_err().to_string().contains("lr = -1"));
        let mut s = TrialSpec::paper(Task::SignalGame, Estimator::Softmax, 1);
        s.hyper.bits = Some(32);
        assert_eq!(
            s.validate(),
            Err(SpecError::NotApplicable {
                name: "bits",
                task: Task::SignalGame,
                estimator: Estimator::Softmax
            })
        );
    }

    #[test]
    fn canonical_json_round_trips_and_refuses_unknown_fields() {
        let spec = TrialSpec::paper(Task::Bitvec, Estimator::Sparsemap, 7).with_bits(128);
        let json = spec.canonical_json();
        assert_eq!(serde_json::from_str::<TrialSpec>(&json).unwrap(), spec);
        assert_eq!(spec.clone().canonical_json(), json);
        let bad = json.replacen("\"seed\"", "\"sede\"", 1);
        assert!(
            serde_json::from_str::<TrialSpec>(&bad)
                .unwrap_err()
                .to_string()
                .contains("sede")
        );
    }
}
