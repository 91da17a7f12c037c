//! Sweep files: YAML naming a sweep, defaults, and experiments (a task, its estimators with
//! per-estimator hyperparameters, seeds, bit sizes and explicit grids), expanded into
//! validated trials. Expansion is deterministic, and each trial's identity is the SHA-256 of
//! its canonical spec, so submitting a file twice adds nothing and adding seeds adds exactly
//! the new trials.
//!
//! ```yaml
//! name: quick
//! defaults: {epochs: 1, test_limit: 500}
//! experiments:
//!   - task: bitvec
//!     bits: [32]
//!     seeds: [1, 2]
//!     estimators:
//!       sparsemap: {}
//!       gumbel: {lr: 2.0e-3}
//!     grid: {batch_size: [32, 64]}
//! ```
//!
//! A value is taken from, in increasing precedence: the paper's defaults for the (task,
//! estimator) pair, `defaults`, the experiment's `hyper`, the estimator's entry, the grid.

use std::collections::BTreeMap;
use std::path::Path;

use lvm_core::spec::{Estimator, Task, TrialSpec};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Why a sweep file cannot be used; nothing is run or stored when this happens.
#[derive(Debug, Error)]
pub enum SweepError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Read {
        /// The sweep file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML is malformed or has an unknown or mistyped key (the message shows the line).
    #[error("{file}: {message}")]
    Syntax {
        /// The sweep file.
        file: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value is not allowed.
    #[error("{file}: experiment {experiment} ({task}), {key}: {message}")]
    Invalid {
        /// The sweep file.
        file: String,
        /// Experiment number, from 1.
        experiment: usize,
        /// The experiment's task.
        task: String,
        /// The key at fault.
        key: String,
        /// What is wrong and what would be valid.
        message: String,
    },
}

/// Hyperparameters a sweep may set; any left out keep the paper's value.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Learning rate.
    pub lr: Option<f64>,
    /// Batch size.
    pub batch_size: Option<usize>,
    /// Epochs of the main stage.
    pub epochs: Option<usize>,
    /// Cap on main-stage optimizer steps.
    pub steps: Option<u64>,
    /// L2 weight decay.
    pub weight_decay: Option<f64>,
    /// Entropy coefficient.
    pub entropy_coeff: Option<f64>,
    /// SparseMAP budget.
    pub budget: Option<usize>,
    /// k of top-k sparsemax or Sum&Sample.
    pub k: Option<usize>,
    /// SSVAE warm-start epochs.
    pub warm_start_epochs: Option<usize>,
    /// Importance samples for the bit-vector NLL.
    pub importance_samples: Option<usize>,
    /// Test examples evaluated.
    pub test_limit: Option<usize>,
    /// Images per signalling game.
    pub game_size: Option<usize>,
}

/// The grid keys and how each sets a value.
const GRID_KEYS: [&str; 6] = ["lr", "batch_size", "epochs", "steps", "entropy_coeff", "k"];

impl Overrides {
    fn apply(&self, spec: &mut TrialSpec) {
        let h = &mut spec.hyper;
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(v) = self.$field {
                    h.$field = v;
                }
            )*};
        }
        macro_rules! set_option {
            ($($field:ident),*) => {$(
                if self.$field.is_some() {
                    h.$field = self.$field;
                }
            )*};
        }
        set!(lr, batch_size, epochs, weight_decay, entropy_coeff);
        set_option!(
            steps,
            budget,
            k,
            warm_start_epochs,
            importance_samples,
            test_limit,
            game_size
        );
    }

    fn set_grid(&mut self, key: &str, value: f64) -> Result<(), String> {
        let whole = || {
            if value >= 0.0 && value.fract() == 0.0 && value < 1e15 {
                Ok(value as u64)
            } else {
                Err(format!("{value} is not a whole number"))
            }
        };
        match key {
            "lr" => self.lr = Some(value),
            "entropy_coeff" => self.entropy_coeff = Some(value),
            "batch_size" => self.batch_size = Some(whole()? as usize),
            "epochs" => self.epochs = Some(whole()? as usize),
            "steps" => self.steps = Some(whole()?),
            "k" => self.k = Some(whole()? as usize),
            other => {
                return Err(format!(
                    "'{other}' cannot be a grid key (valid: {})",
                    GRID_KEYS.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// A sweep file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepFile {
    name: String,
    #[serde(default)]
    defaults: Overrides,
    experiments: Vec<ExperimentFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExperimentFile {
    task: String,
    seeds: Vec<u64>,
    estimators: BTreeMap<String, Option<Overrides>>,
    #[serde(default)]
    bits: Vec<usize>,
    #[serde(default)]
    hyper: Overrides,
    #[serde(default)]
    grid: BTreeMap<String, Vec<f64>>,
}

/// One trial of a sweep: its identity and its spec.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTrial {
    /// The first 16 hex digits of the SHA-256 of the spec's canonical JSON.
    pub id: String,
    /// What to train.
    pub spec: TrialSpec,
}

/// A sweep expanded into trials, in a deterministic order without duplicates.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    /// The sweep's name.
    pub name: String,
    /// Its trials.
    pub trials: Vec<PlannedTrial>,
}

/// The identity of a trial: the SHA-256 of its canonical JSON, first 16 hex digits.
pub fn trial_id(spec: &TrialSpec) -> String {
    let digest = Sha256::digest(spec.canonical_json().as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl Sweep {
    /// Reads and expands a sweep file.
    pub fn load(path: &Path) -> Result<Self, SweepError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SweepError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&text, &file)
    }

    /// Expands the YAML `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, SweepError> {
        let sweep: SweepFile = serde_saphyr::from_str(text).map_err(|e| SweepError::Syntax {
            file: file.into(),
            message: e.to_string(),
        })?;
        if sweep.name.trim().is_empty() {
            return Err(SweepError::Syntax {
                file: file.into(),
                message: "name: must not be empty".into(),
            });
        }
        let mut trials = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, experiment) in sweep.experiments.iter().enumerate() {
            let invalid = |key: &str, message: String| SweepError::Invalid {
                file: file.into(),
                experiment: i + 1,
                task: experiment.task.clone(),
                key: key.into(),
                message,
            };
            let task: Task = experiment
                .task
                .parse()
                .map_err(|e| invalid("task", format!("{e}")))?;
            if experiment.seeds.is_empty() {
                return Err(invalid("seeds", "at least one seed is needed".into()));
            }
            if experiment.estimators.is_empty() {
                let valid = task
                    .estimators()
                    .iter()
                    .map(|e| e.name())
                    .collect::<Vec<_>>();
                return Err(invalid(
                    "estimators",
                    format!("none given (valid: {})", valid.join(", ")),
                ));
            }
            let bits: Vec<Option<usize>> = match (task, experiment.bits.is_empty()) {
                (Task::Bitvec, true) => vec![None],
                (Task::Bitvec, false) => experiment.bits.iter().copied().map(Some).collect(),
                (_, true) => vec![None],
                (_, false) => return Err(invalid("bits", "only the bitvec task has bits".into())),
            };
            let points =
                grid_points(&experiment.grid).map_err(|(k, m)| invalid(&format!("grid.{k}"), m))?;
            for (name, own) in &experiment.estimators {
                let estimator: Estimator = name
                    .parse()
                    .map_err(|e| invalid("estimators", format!("{e}")))?;
                for &b in &bits {
                    for point in &points {
                        for &seed in &experiment.seeds {
                            let mut spec = TrialSpec::paper(task, estimator, seed);
                            if let Some(b) = b {
                                spec = spec.with_bits(b);
                            }
                            sweep.defaults.apply(&mut spec);
                            experiment.hyper.apply(&mut spec);
                            if let Some(own) = own {
                                own.apply(&mut spec);
                            }
                            point.apply(&mut spec);
                            spec.validate().map_err(|e| {
                                invalid(&format!("estimators.{name}"), format!("{e}"))
                            })?;
                            let id = trial_id(&spec);
                            if seen.insert(id.clone()) {
                                trials.push(PlannedTrial { id, spec });
                            }
                        }
                    }
                }
            }
        }
        Ok(Sweep {
            name: sweep.name,
            trials,
        })
    }
}

/// Every point of the grid (the cartesian product, keys in sorted order).
fn grid_points(grid: &BTreeMap<String, Vec<f64>>) -> Result<Vec<Overrides>, (String, String)> {
    let mut points = vec![Overrides::default()];
    for (key, values) in grid {
        if values.is_empty() {
            return Err((key.clone(), "an empty list of values".into()));
        }
        let mut next = Vec::with_capacity(points.len() * values.len());
        for point in &points {
            for &value in values {
                let mut p = point.clone();
                p.set_grid(key, value).map_err(|m| (key.clone(), m))?;
                next.push(p);
            }
        }
        points = next;
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = "
name: small
defaults: {epochs: 1, test_limit: 100}
experiments:
  - task: bitvec
    bits: [32, 128]
    seeds: [1, 2]
    estimators:
      sparsemap: {}
      gumbel: {lr: 2.0e-3}
    grid: {batch_size: [16, 64]}
  - task: ssvae
    seeds: [43]
    hyper: {warm_start_epochs: 2}
    estimators: {sparsemax: null}
";

    #[test]
    fn expansion_is_deterministic_with_content_ids() {
        let a = Sweep::parse(SMALL, "small.yaml").unwrap();
        // 2 estimators × 2 bit sizes × 2 batch sizes × 2 seeds + 1 = 17, by hand.
        assert_eq!(a.trials.len(), 17);
        assert_eq!(a, Sweep::parse(SMALL, "small.yaml").unwrap());
        let gumbel = a
            .trials
            .iter()
            .find(|t| t.spec.estimator == Estimator::Gumbel && t.spec.hyper.bits == Some(128))
            .unwrap();
        // Precedence: the estimator's entry over the paper's value (1e-3) and the defaults.
        assert_eq!(gumbel.spec.hyper.lr, 2e-3);
        assert_eq!(gumbel.spec.hyper.epochs, 1);
        assert_eq!(gumbel.id, trial_id(&gumbel.spec));
        assert_eq!(gumbel.id.len(), 16);
        let ssvae = a.trials.last().unwrap();
        assert_eq!(ssvae.spec.hyper.warm_start_epochs, Some(2));

        // Adding a seed adds exactly the new trials; the old ids are unchanged.
        let more = Sweep::parse(&SMALL.replace("seeds: [43]", "seeds: [43, 44]"), "s").unwrap();
        let old: std::collections::HashSet<_> = a.trials.iter().map(|t| &t.id).collect();
        let added: Vec<_> = more
            .trials
            .iter()
            .filter(|t| !old.contains(&t.id))
            .collect();
        assert_eq!(added.len(), 1);
        assert_eq!(added[0].spec.seed, 44);
        assert_eq!(more.trials.len(), 18);
    }

    #[test]
    fn the_shipped_sweeps_expand() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sweeps");
        // paper: 8 SSVAE × 10 seeds + 8 game × 10 seeds + 8 bit-vector × 2 sizes × 1 seed.
        let paper = Sweep::load(&dir.join("paper.yaml")).unwrap();
        assert_eq!(paper.trials.len(), 80 + 80 + 16);
        let ci = Sweep::load(&dir.join("ci.yaml")).unwrap();
        assert_eq!(ci.trials.len(), 3 * 8 * 2);
        // quick: the same shape as ci, every (task, estimator) pair with two seeds.
        let quick = Sweep::load(&dir.join("quick.yaml")).unwrap();
        assert_eq!(quick.trials.len(), 3 * 8 * 2);
        let pairs: std::collections::BTreeSet<_> = quick
            .trials
            .iter()
            .map(|t| (t.spec.task.name(), t.spec.estimator.name()))
            .collect();
        assert_eq!(pairs.len(), 24);
        let ss = paper
            .trials
            .iter()
            .find(|t| {
                t.spec.estimator == Estimator::SumAndSample && t.spec.task == Task::SignalGame
            })
            .unwrap();
        assert_eq!((ss.spec.hyper.epochs, ss.spec.seed), (200, 984));
    }

    #[test]
    fn bad_files_name_the_file_the_key_and_the_valid_values() {
        let cases = [
            (
                SMALL.replace("sparsemap: {}", "sparsemapp: {}"),
                "valid: sfe",
            ),
            (
                SMALL.replace("task: ssvae", "task: mnist"),
                "valid: ssvae, signal_game, bitvec",
            ),
            (
                SMALL.replace("{lr: 2.0e-3}", "{lr: 2.0e-3, momentum: 1}"),
                "momentum",
            ),
            (SMALL.replace("{lr: 2.0e-3}", "{lr: -1}"), "lr = -1"),
            (
                SMALL.replace("{batch_size: [16, 64]}", "{budget: [1]}"),
                "cannot be a grid key",
            ),
            (
                SMALL.replace(
                    "estimators: {sparsemax: null}",
                    "estimators: {sparsemap: null}",
                ),
                "sparsemap",
            ),
            (SMALL.replace("seeds: [43]", "seeds: []"), "seeds"),
            ("name: x\nexperiments: [\n".to_string(), "line"),
        ];
        for (text, expected) in cases {
            let err = Sweep::parse(&text, "bad.yaml").unwrap_err().to_string();
            assert!(err.starts_with("bad.yaml: "), "{err}");
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn an_unknown_key_is_shown_at_its_line_with_the_valid_keys() {
        let text = "name: x\nexperiments:\n  - task: ssvae\n    seeds: [1]\n    \
                    estimators: {sfe: {lr: 0.1, momentum: 3}}\n";
        let err = Sweep::parse(text, "b.yaml").unwrap_err().to_string();
        assert!(err.starts_with("b.yaml: error: line 5 column 33: unknown field `momentum`"));
        assert!(err.contains("expected one of lr, batch_size"), "{err}");
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::super::Sweep;
        use super::SMALL;

        const TOKENS: &[&str] = &[
            "name: ",
            "experiments:",
            "defaults: ",
            "- ",
            "task: ",
            "ssvae",
            "bitvec",
            "seeds: ",
            "[",
            "]",
            "{",
            "}",
            ", ",
            "1",
            "-1",
            "1e400",
            "18446744073709551616",
            "estimators: ",
            "sfe: ",
            "sparsemap: ",
            "grid: ",
            "lr: ",
            "bits: ",
            "k: ",
            "\n",
            "  ",
            "null",
            "~",
            "&a ",
            "*a",
            "!!str ",
            "0x10",
            ".nan",
            "\"",
            "'",
            "#",
            ": ",
            "? ",
        ];

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn never_panics_on_arbitrary_text(text in "\\PC{0,200}") {
                let _ = Sweep::parse(&text, "fuzz.yaml");
            }

            #[test]
            fn never_panics_on_mutated_sweeps(
                at in 0usize..400, ch in any::<char>(), cut in 0usize..400
            ) {
                let mut chars: Vec<char> = SMALL.chars().collect();
                let i = at % chars.len();
                chars[i] = ch;
                chars.truncate(chars.len() - cut % chars.len());
                let _ = Sweep::parse(&chars.into_iter().collect::<String>(), "fuzz.yaml");
            }

            #[test]
            fn never_panics_on_yaml_token_soup(
                picks in prop::collection::vec(0usize..TOKENS.len(), 0..80)
            ) {
                let text: String = picks.iter().map(|&i| TOKENS[i]).collect();
                let _ = Sweep::parse(&text, "fuzz.yaml");
            }
        }
    }
}
