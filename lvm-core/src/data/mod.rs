//! Datasets: the IDX and NPY readers, the pinned dataset files and the data directory that
//! verifies and, when needed, downloads them, typed loaders for what the tasks read, and the
//! signalling game's images and sampler.

pub mod error;
pub mod files;
pub mod idx;
pub mod npy;
pub mod signal_game;

use std::path::Path;

pub use error::DataError;
pub use files::{DataDir, DataFile, Source, known};

/// A set of 28×28 grey-level images with their class labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSet {
    /// Pixel intensities 0–255, row-major, `len × 784`.
    pub pixels: Vec<u8>,
    /// Class labels 0–9.
    pub labels: Vec<u8>,
}

/// Pixels per image.
pub const IMAGE_PIXELS: usize = 28 * 28;

impl ImageSet {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.pixels[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS]
    }

    /// Reads and cross-checks an images file and a labels file.
    pub fn load(dir: &DataDir, images: &DataFile, labels: &DataFile) -> Result<Self, DataError> {
        let image_path = dir.root().join(images.path);
        let label_path = dir.root().join(labels.path);
        let pixels = idx::parse_idx(&dir.read(images)?, &image_path)?;
        let classes = idx::parse_idx(&dir.read(labels)?, &label_path)?;
        if pixels.dims.len() != 3 || pixels.dims[1..] != [28, 28] {
            let detail = format!(
                "expected images of shape [n, 28, 28], found {:?}",
                pixels.dims
            );
            return Err(DataError::Shape {
                file: image_path,
                detail,
            });
        }
        if classes.dims != [pixels.dims[0]] {
            let detail = format!(
                "expected {} labels, found shape {:?}",
                pixels.dims[0], classes.dims
            );
            return Err(DataError::Shape {
                file: label_path,
                detail,
            });
        }
        if let Some(bad) = classes.data.iter().find(|&&c| c > 9) {
            return Err(DataError::Shape {
                file: label_path,
                detail: format!("label {bad} > 9"),
            });
        }
        Ok(Self {
            pixels: pixels.data,
            labels: classes.data,
        })
    }
}

/// Reads an NPY vector of indices, each below `bound`.
pub fn load_indices(dir: &DataDir, file: &DataFile, bound: usize) -> Result<Vec<usize>, DataError> {
    let path = dir.root().join(file.path);
    let array = npy::parse_npy(&dir.read(file)?, &path)?;
    indices_from(&array, &path, bound)
}

/// The data directory tests read: `LVM_DATA_DIR` (or `data`), where a relative path is taken
/// from the workspace root when it does not exist from the test's working directory (cargo
/// runs each crate's tests from that crate's directory, CI names the path from the root).
#[cfg(test)]
pub(crate) fn test_data_dir() -> DataDir {
    let given =
        std::env::var_os("LVM_DATA_DIR").map_or_else(|| "data".into(), std::path::PathBuf::from);
    let root = if given.is_relative() && !given.exists() {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(&given)
    } else {
        given
    };
    DataDir::new(root, Source::PublicMirrors)
}

fn indices_from(array: &npy::NpyArray, path: &Path, bound: usize) -> Result<Vec<usize>, DataError> {
    if array.shape.len() != 1 {
        let detail = format!(
            "expected a vector of indices, found shape {:?}",
            array.shape
        );
        return Err(DataError::Shape {
            file: path.into(),
            detail,
        });
    }
    array
        .to_i64(path)?
        .into_iter()
        .map(|i| {
            usize::try_from(i)
                .ok()
                .filter(|&i| i < bound)
                .ok_or_else(|| DataError::Shape {
                    file: path.into(),
                    detail: format!("index {i} outside 0..{bound}"),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mnist_and_fashion_load_with_the_documented_sizes_and_balance() {
        let dir = test_data_dir();
        let train =
            ImageSet::load(&dir, &known::MNIST_TRAIN_IMAGES, &known::MNIST_TRAIN_LABELS).unwrap();
        assert_eq!(train.len(), 60_000);
        let test = ImageSet::load(
            &dir,
            &known::FASHION_TEST_IMAGES,
            &known::FASHION_TEST_LABELS,
        )
        .unwrap();
        // Fashion-MNIST has exactly 1000 test images per class (shared/data/README.md).
        let mut counts = [0usize; 10];
        test.labels
            .iter()
            .for_each(|&c| counts[usize::from(c)] += 1);
        assert_eq!(counts, [1000; 10]);
    }

    #[test]
    fn the_ssvae_splits_partition_the_mnist_training_set() {
        let dir = test_data_dir();
        let mut all: Vec<usize> = [
            known::SSVAE_LABELED,
            known::SSVAE_UNLABELED,
            known::SSVAE_VALIDATION,
        ]
        .iter()
        .flat_map(|f| load_indices(&dir, f, 60_000).unwrap())
        .collect();
        // Reference §7.1: 5000 + 45000 + 10000, pairwise disjoint, covering 0..60000;
        // the labelled file starts 45872, 27715, 13311.
        let labeled = load_indices(&dir, &known::SSVAE_LABELED, 60_000).unwrap();
        assert_eq!(labeled[..3], [45872, 27715, 13311]);
        all.sort_unstable();
        assert_eq!(all, (0..60_000).collect::<Vec<_>>());
    }
}
