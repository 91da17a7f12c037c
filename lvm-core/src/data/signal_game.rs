//! The signalling game's images and game sampler (reference §8.1). The original's ImageNet/VGG
//! features are not public, so the default game uses real images: 20 concepts, the ten MNIST
//! digits (concepts 0–9) and the ten Fashion-MNIST classes (10–19), with the L2-normalized
//! pixels as features; the training games use the training files and the test games the test
//! files, so their images are disjoint. A user with other features passes an `.npy` `[N, d]`
//! float matrix and an `.npy` label vector.
//!
//! A game of size `G`: `G` distinct concepts drawn uniformly, one image of each drawn uniformly;
//! the sender sees the list with the target first, the receiver a uniform permutation of it,
//! and the label is the receiver position that holds the target.

use std::path::Path;

use rand::Rng;
use rand::seq::SliceRandom;

use super::error::DataError;
use super::files::DataDir;
use super::{ImageSet, known, npy};

/// Images grouped by concept, with their features.
#[derive(Debug, Clone)]
pub struct GameImages {
    /// Feature rows, L2-normalized, `n × dim`.
    features: Vec<f32>,
    dim: usize,
    /// Image indices of each concept, concepts in order of first appearance.
    by_concept: Vec<Vec<usize>>,
}

/// Which images of the default game.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The training files of MNIST and Fashion-MNIST.
    Train,
    /// The test files.
    Test,
}

/// One game: image indices into [`GameImages`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Game {
    /// The sender's images, target first.
    pub sender: Vec<usize>,
    /// The receiver's images: a permutation of `sender`.
    pub receiver: Vec<usize>,
    /// Position of the target in `receiver`.
    pub target: usize,
}

impl GameImages {
    /// Builds the set from raw feature rows and integer concept labels, normalizing each row
    /// to unit L2 norm; `file` names the source in errors.
    pub fn new(
        features: Vec<f32>,
        dim: usize,
        labels: &[i64],
        file: &Path,
    ) -> Result<Self, DataError> {
        let shape = |detail: String| DataError::Shape {
            file: file.into(),
            detail,
        };
        if dim == 0 || features.len() != labels.len() * dim {
            let rows = features.len().checked_div(dim).unwrap_or(0);
            return Err(shape(format!(
                "{rows} feature rows of {dim} for {} labels",
                labels.len()
            )));
        }
        let mut features = features;
        for (i, row) in features.chunks_mut(dim).enumerate() {
            let norm = row
                .iter()
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
                .sqrt();
            if !norm.is_finite() || norm == 0.0 {
                return Err(shape(format!(
                    "feature row {i} has norm {norm}; rows must be finite and non-zero"
                )));
            }
            row.iter_mut()
                .for_each(|v| *v = (f64::from(*v) / norm) as f32);
        }
        let mut seen: Vec<i64> = Vec::new();
        let mut by_concept: Vec<Vec<usize>> = Vec::new();
        for (i, label) in labels.iter().enumerate() {
            match seen.iter().position(|l| l == label) {
                Some(c) => by_concept[c].push(i),
                None => {
                    seen.push(*label);
                    by_concept.push(vec![i]);
                }
            }
        }
        Ok(Self {
            features,
            dim,
            by_concept,
        })
    }

    /// The default game's images: MNIST digits and Fashion-MNIST classes, `limit` images per
    /// concept at most (the first ones in file order; `None`: all).
    pub fn default_split(
        dir: &DataDir,
        split: Split,
        limit: Option<usize>,
    ) -> Result<Self, DataError> {
        let (digits, fashion) = match split {
            Split::Train => (
                ImageSet::load(dir, &known::MNIST_TRAIN_IMAGES, &known::MNIST_TRAIN_LABELS)?,
                ImageSet::load(
                    dir,
                    &known::FASHION_TRAIN_IMAGES,
                    &known::FASHION_TRAIN_LABELS,
                )?,
            ),
            Split::Test => (
                ImageSet::load(dir, &known::MNIST_TEST_IMAGES, &known::MNIST_TEST_LABELS)?,
                ImageSet::load(
                    dir,
                    &known::FASHION_TEST_IMAGES,
                    &known::FASHION_TEST_LABELS,
                )?,
            ),
        };
        let (mut features, mut labels, mut taken) = (Vec::new(), Vec::new(), [0usize; 20]);
        for (set, offset) in [(&digits, 0), (&fashion, 10)] {
            for i in 0..set.len() {
                let concept = usize::from(set.labels[i]) + offset;
                if limit.is_some_and(|l| taken[concept] >= l) {
                    continue;
                }
                taken[concept] += 1;
                features.extend(set.image(i).iter().map(|&p| f32::from(p)));
                labels.push(concept as i64);
            }
        }
        Self::new(features, super::IMAGE_PIXELS, &labels, dir.root())
    }

    /// Features from an `.npy` `[N, d]` float matrix and concept labels from an `.npy` integer
    /// vector of length `N`.
    pub fn from_npy(features: &Path, labels: &Path) -> Result<Self, DataError> {
        let read = |path: &Path| std::fs::read(path).map_err(|e| DataError::io(path, e));
        let matrix = npy::parse_npy(&read(features)?, features)?;
        let [_, dim] = matrix.shape[..] else {
            let detail = format!("expected a [N, d] matrix, found shape {:?}", matrix.shape);
            return Err(DataError::Shape {
                file: features.into(),
                detail,
            });
        };
        let classes = npy::parse_npy(&read(labels)?, labels)?;
        if classes.shape.len() != 1 {
            let detail = format!("expected a label vector, found shape {:?}", classes.shape);
            return Err(DataError::Shape {
                file: labels.into(),
                detail,
            });
        }
        Self::new(
            matrix.to_f32(features)?,
            dim,
            &classes.to_i64(labels)?,
            labels,
        )
    }

    /// Number of concepts.
    pub fn concepts(&self) -> usize {
        self.by_concept.len()
    }

    /// Feature length `d`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The normalized features of image `i`.
    pub fn feature(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }

    /// Draws `batch` games of `game_size` images.
    pub fn sample(
        &self,
        batch: usize,
        game_size: usize,
        rng: &mut impl Rng,
    ) -> Result<Vec<Game>, DataError> {
        if game_size == 0 || game_size > self.concepts() {
            let detail = format!(
                "a game of {game_size} images needs that many concepts; there are {}",
                self.concepts()
            );
            return Err(DataError::Shape {
                file: "signal game".into(),
                detail,
            });
        }
        let mut concepts: Vec<usize> = (0..self.concepts()).collect();
        Ok((0..batch)
            .map(|_| {
                let (chosen, _) = concepts.partial_shuffle(rng, game_size);
                let sender: Vec<usize> = chosen
                    .iter()
                    .map(|&c| self.by_concept[c][rng.random_range(0..self.by_concept[c].len())])
                    .collect();
                let mut order: Vec<usize> = (0..game_size).collect();
                order.shuffle(rng);
                let receiver = order.iter().map(|&j| sender[j]).collect();
                let target = order
                    .iter()
                    .position(|&j| j == 0)
                    .expect("a permutation holds 0");
                Game {
                    sender,
                    receiver,
                    target,
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::data::test_data_dir;

    fn toy(concepts: usize, per: usize) -> GameImages {
        let labels: Vec<i64> = (0..concepts * per)
            .map(|i| (i % concepts) as i64 * 7)
            .collect();
        let features: Vec<f32> = (0..concepts * per * 3)
            .map(|i| (i % 5) as f32 + 1.0)
            .collect();
        GameImages::new(features, 3, &labels, Path::new("toy")).unwrap()
    }

    #[test]
    fn games_hold_distinct_concepts_and_a_uniform_target_position() {
        let images = toy(20, 4);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let games = images.sample(8000, 16, &mut rng).unwrap();
        let mut positions = [0usize; 16];
        for game in &games {
            let mut concepts: Vec<usize> = game.sender.iter().map(|&i| i % 20).collect();
            concepts.sort_unstable();
            concepts.dedup();
            assert_eq!(concepts.len(), 16);
            assert_eq!(game.receiver[game.target], game.sender[0]);
            let mut a = game.sender.clone();
            let mut b = game.receiver.clone();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b);
            positions[game.target] += 1;
        }
        // 8000 games over 16 positions: 500 expected each, binomial sd ≈ 21.7; 5 sd.
        assert!(
            positions
                .iter()
                .all(|&n| (n as f64 - 500.0).abs() < 5.0 * 21.7),
            "{positions:?}"
        );
        let again = images
            .sample(8000, 16, &mut ChaCha8Rng::seed_from_u64(3))
            .unwrap();
        assert_eq!(again, games, "same seed, same games");
    }

    #[test]
    fn features_are_unit_norm_and_bad_inputs_are_refused() {
        let images = toy(3, 2);
        let norm: f32 = images.feature(4).iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-6);
        assert!(
            images
                .sample(1, 4, &mut ChaCha8Rng::seed_from_u64(0))
                .unwrap_err()
                .to_string()
                .contains("there are 3")
        );
        let err = GameImages::new(vec![0.0; 6], 3, &[1, 2], Path::new("f.npy")).unwrap_err();
        assert!(
            err.to_string().contains("f.npy") && err.to_string().contains("norm 0"),
            "{err}"
        );
        let err = GameImages::new(vec![1.0; 5], 3, &[1, 2], Path::new("f.npy")).unwrap_err();
        assert!(
            err.to_string().contains("1 feature rows of 3 for 2 labels"),
            "{err}"
        );
    }

    #[test]
    fn the_default_game_has_twenty_concepts_with_disjoint_train_and_test_images() {
        let dir = test_data_dir();
        let train = GameImages::default_split(&dir, Split::Train, Some(50)).unwrap();
        let test = GameImages::default_split(&dir, Split::Test, Some(50)).unwrap();
        assert_eq!((train.concepts(), test.concepts()), (20, 20));
        assert_eq!(train.dim(), 784);
        // Disjoint by construction (different files); check no test image equals a train one.
        let train_rows: std::collections::HashSet<Vec<u32>> = (0..1000)
            .map(|i| train.feature(i).iter().map(|v| v.to_bits()).collect())
            .collect();
        assert!((0..1000).all(|i| {
            !train_rows.contains(
                &test
                    .feature(i)
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
            )
        }));
    }

    #[test]
    fn user_features_come_from_npy_files() {
        let dir = tempfile::tempdir().unwrap();
        let (features, labels) = (dir.path().join("x.npy"), dir.path().join("y.npy"));
        let f: Vec<u8> = (0..16 * 2)
            .flat_map(|i| (i as f32 + 1.0).to_le_bytes())
            .collect();
        std::fs::write(&features, npy::tests::npy("<f4", "(16, 2)", &f)).unwrap();
        let l: Vec<u8> = (0..16i64).flat_map(|i| i.to_le_bytes()).collect();
        std::fs::write(&labels, npy::tests::npy("<i8", "(16,)", &l)).unwrap();
        let images = GameImages::from_npy(&features, &labels).unwrap();
        assert_eq!((images.concepts(), images.dim()), (16, 2));
        std::fs::write(&labels, npy::tests::npy("<i8", "(8,)", &l[..64])).unwrap();
        let err = GameImages::from_npy(&features, &labels)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("y.npy") && err.contains("for 8 labels"),
            "{err}"
        );
    }
}
