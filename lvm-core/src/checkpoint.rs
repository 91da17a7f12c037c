//! Trial checkpoints: one file per trial, replaced atomically at each epoch boundary.
//!
//! ```text
//! "LVMCKPT1"                      8 bytes, magic and format version
//! header length, header           u64 LE, JSON {spec, progress, estimator}
//! parameters length, parameters   u64 LE, burnpack module record
//! optimizer length, optimizer     u64 LE, burnpack optimizer record
//! SHA-256 of everything above     32 bytes
//! ```
//!
//! A file that is truncated, altered, of another format or of another trial is refused with
//! an error naming the file and the problem; it is never half-applied. Writes go to a
//! temporary file beside the checkpoint, are flushed to disk, then renamed over it, so a
//! crash at any instant leaves either the old checkpoint or the new one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::estimators::latent::EstimatorState;
use crate::spec::TrialSpec;
use crate::tasks::{ModelState, TrainError};
use crate::train::Progress;

const MAGIC: &[u8; 8] = b"LVMCKPT1";
const DIGEST: usize = 32;

/// A trial's progress and model state.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Epochs done and decoder-call totals.
    pub progress: Progress,
    /// Parameters, optimizer and estimator state.
    pub model: ModelState,
}

#[derive(Serialize, Deserialize)]
struct Header {
    spec: TrialSpec,
    progress: Progress,
    estimator: EstimatorState,
}

/// The checkpoint file of one trial.
#[derive(Debug, Clone)]
pub struct CheckpointFile {
    path: PathBuf,
    spec: TrialSpec,
}

impl CheckpointFile {
    /// The checkpoint of `spec` in `dir` (`dir/checkpoint.bin`).
    pub fn new(dir: &Path, spec: &TrialSpec) -> Self {
        Self {
            path: dir.join("checkpoint.bin"),
            spec: spec.clone(),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, reason: impl Into<String>) -> TrainError {
        TrainError::Checkpoint {
            path: self.path.display().to_string(),
            reason: reason.into(),
        }
    }

    /// Writes `checkpoint` atomically.
    pub fn save(&self, checkpoint: &Checkpoint) -> Result<(), TrainError> {
        let header = Header {
            spec: self.spec.clone(),
            progress: checkpoint.progress.clone(),
            estimator: checkpoint.model.estimator,
        };
        let header = serde_json::to_vec(&header).map_err(|e| self.error(e.to_string()))?;
        let mut bytes = MAGIC.to_vec();
        for part in [
            &header,
            &checkpoint.model.parameters,
            &checkpoint.model.optimizer,
        ] {
            bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
            bytes.extend_from_slice(part);
        }
        let digest = Sha256::digest(&bytes);
        bytes.extend_from_slice(&digest);

        let io = |e: std::io::Error| self.error(e.to_string());
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let partial = self.path.with_extension("bin.partial");
        let mut file = std::fs::File::create(&partial).map_err(io)?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(io)?;
        std::fs::rename(&partial, &self.path).map_err(io)
    }

    /// Reads the checkpoint, or `None` when there is none yet.
    pub fn load(&self) -> Result<Option<Checkpoint>, TrainError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.error(e.to_string())),
        };
        self.parse(&bytes).map(Some)
    }

    fn parse(&self, bytes: &[u8]) -> Result<Checkpoint, TrainError> {
        if bytes.len() < MAGIC.len() + DIGEST || &bytes[..MAGIC.len()] != MAGIC {
            return Err(self.error("not an lvm-sweep checkpoint (bad magic number or too short)"));
        }
        let (body, digest) = bytes.split_at(bytes.len() - DIGEST);
        if Sha256::digest(body).as_slice() != digest {
            return Err(self.error("checksum mismatch: the file is truncated or corrupt"));
        }
        let mut rest = &body[MAGIC.len()..];
        let mut parts = Vec::new();
        for name in ["header", "parameters", "optimizer"] {
            let corrupt = || self.error(format!("the {name} section is truncated"));
            let (len, tail) = rest.split_first_chunk::<8>().ok_or_else(corrupt)?;
            let len = usize::try_from(u64::from_le_bytes(*len)).map_err(|_| corrupt())?;
            if len > tail.len() {
                return Err(corrupt());
            }
            let (part, tail) = tail.split_at(len);
            parts.push(part);
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(self.error("trailing bytes after the optimizer section"));
        }
        let header: Header = serde_json::from_slice(parts[0])
            .map_err(|e| self.error(format!("unreadable header: {e}")))?;
        if header.spec != self.spec {
            return Err(self.error(format!(
                "it belongs to another trial ({}), not {}",
                header.spec.canonical_json(),
                self.spec.canonical_json()
            )));
        }
        Ok(Checkpoint {
            progress: header.progress,
            model: ModelState {
                parameters: parts[1].to_vec(),
                optimizer: parts[2].to_vec(),
                estimator: header.estimator,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Estimator, Task};

    fn sample() -> Checkpoint {
        Checkpoint {
            progress: Progress {
                epochs: Vec::new(),
                decoder_calls: 10,
                examples: 5,
            },
            model: ModelState {
                parameters: vec![1, 2, 3],
                optimizer: vec![4, 5],
                estimator: EstimatorState {
                    baseline_mean: 1.5,
                    baseline_steps: 3,
                    global_step: 9,
                },
            },
        }
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TrialSpec::paper(Task::Bitvec, Estimator::Sfe, 1);
        let file = CheckpointFile::new(dir.path(), &spec);
        assert_eq!(file.load().unwrap(), None);
        file.save(&sample()).unwrap();
        assert_eq!(file.load().unwrap(), Some(sample()));

        let good = std::fs::read(file.path()).unwrap();
        // Every truncation and every single-byte change is refused, never applied.
        for cut in [0, 7, 8, 20, good.len() - 1] {
            std::fs::write(file.path(), &good[..cut]).unwrap();
            let err = file.load().unwrap_err().to_string();
            assert!(err.contains("checkpoint.bin"), "{err}");
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            std::fs::write(file.path(), &bad).unwrap();
            assert!(file.load().is_err(), "byte {i}");
        }

        // Another trial's checkpoint is refused by name.
        std::fs::write(file.path(), &good).unwrap();
        let other = CheckpointFile::new(
            dir.path(),
            &TrialSpec::paper(Task::Bitvec, Estimator::Sfe, 2),
        );
        let err = other.load().unwrap_err().to_string();
        assert!(err.contains("another trial"), "{err}");
    }
}
