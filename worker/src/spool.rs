//! The worker's spool: reports the coordinator has not acknowledged, kept on disk when the
//! coordinator stays away longer than the worker is willing to wait. One file per attempt,
//! `<trial>-<attempt>.spool`, holding its undelivered epoch reports and its finish report in
//! order, each a kind byte (`E` or `F`) and a length-delimited protobuf message. The file is
//! written to a temporary name and renamed, so a crash leaves either the whole file or none.
//! A worker started on the same spool directory delivers the files before asking for work
//! and deletes each once every report in it has been answered (accepted or rejected as
//! stale: either way it must not be sent again).

use std::path::{Path, PathBuf};

use lvm_proto::v1::{EpochReport, FinishReport};
use prost::Message;

/// One undelivered report.
#[derive(Debug, Clone, PartialEq)]
pub enum Spooled {
    /// An epoch's metrics (and checkpoint).
    Epoch(EpochReport),
    /// The attempt's outcome.
    Finish(FinishReport),
}

/// Why a spool file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// I/O.
    #[error("spool {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The bytes are not a spool.
    #[error("spool {path}: corrupt at byte {offset}: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where.
        offset: usize,
        /// What.
        detail: String,
    },
}

/// Writes `reports` for one attempt into `dir`; returns the file.
pub fn write(
    dir: &Path,
    trial: &str,
    attempt: u32,
    reports: &[Spooled],
) -> Result<PathBuf, SpoolError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SpoolError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut bytes = Vec::new();
    for report in reports {
        match report {
            Spooled::Epoch(r) => {
                bytes.push(b'E');
                r.encode_length_delimited(&mut bytes).expect("a Vec grows");
            }
            Spooled::Finish(r) => {
                bytes.push(b'F');
                r.encode_length_delimited(&mut bytes).expect("a Vec grows");
            }
        }
    }
    let path = dir.join(format!("{trial}-{attempt}.spool"));
    let partial = dir.join(format!("{trial}-{attempt}.spool.partial"));
    std::fs::write(&partial, &bytes).map_err(io(&partial))?;
    std::fs::rename(&partial, &path).map_err(io(&path))?;
    Ok(path)
}

/// Reads one spool file.
pub fn read(path: &Path) -> Result<Vec<Spooled>, SpoolError> {
    let bytes = std::fs::read(path).map_err(|source| SpoolError::Io {
        path: path.to_owned(),
        source,
    })?;
    let corrupt = |offset: usize, detail: String| SpoolError::Corrupt {
        path: path.to_owned(),
        offset,
        detail,
    };
    let mut out = Vec::new();
    let mut rest = bytes.as_slice();
    while let Some((&kind, tail)) = rest.split_first() {
        let offset = bytes.len() - rest.len();
        let mut cursor = tail;
        let report = match kind {
            b'E' => EpochReport::decode_length_delimited(&mut cursor).map(Spooled::Epoch),
            b'F' => FinishReport::decode_length_delimited(&mut cursor).map(Spooled::Finish),
            other => return Err(corrupt(offset, format!("unknown record kind {other}"))),
        }
        .map_err(|e| corrupt(offset, e.to_string()))?;
        out.push(report);
        rest = cursor;
    }
    Ok(out)
}

/// The spool files in `dir`, oldest name first; none if the directory does not exist.
pub fn pending(dir: &Path) -> Result<Vec<PathBuf>, SpoolError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(SpoolError::Io {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "spool"))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use lvm_proto::v1::{AttemptRef, Metric, Success, finish_report};

    use super::*;

    fn reports() -> Vec<Spooled> {
        let attempt = Some(AttemptRef {
            trial_id: "t".into(),
            attempt: 2,
        });
        vec![
            Spooled::Epoch(EpochReport {
                worker_id: "w".into(),
                attempt: attempt.clone(),
                epoch: 3,
                metrics: vec![Metric {
                    name: "objective".into(),
                    value: 1.5,
                }],
                checkpoint: vec![9; 1000],
            }),
            Spooled::Finish(FinishReport {
                worker_id: "w".into(),
                attempt,
                outcome: Some(finish_report::Outcome::Success(Success {
                    metrics: vec![],
                    wall_seconds: 2.0,
                })),
            }),
        ]
    }

    #[test]
    fn a_spool_reads_back_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "t", 2, &reports()).unwrap();
        assert_eq!(pending(dir.path()).unwrap(), vec![path.clone()]);
        assert_eq!(read(&path).unwrap(), reports());
    }

    #[test]
    fn every_truncation_or_bad_kind_is_refused_or_reads_a_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "t", 2, &reports()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for cut in 1..bytes.len() {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            // A cut inside a record is an error; a cut between records reads the first one.
            match read(&path) {
                Ok(got) => assert_eq!(got, reports()[..1].to_vec(), "cut {cut}"),
                Err(e) => assert!(e.to_string().contains("corrupt"), "{e}"),
            }
        }
        std::fs::write(&path, b"Xgarbage").unwrap();
        assert!(
            read(&path)
                .unwrap_err()
                .to_string()
                .contains("unknown record kind")
        );
    }
}
