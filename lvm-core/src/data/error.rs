//! Errors of the dataset layer. Every variant names the file (or URL) it is about, so that a
//! user can act on the message alone.

use std::path::PathBuf;

use thiserror::Error;

/// Why a dataset file could not be read, verified or fetched.
#[derive(Debug, Error)]
pub enum DataError {
    /// The file is not in the data directory and could not be downloaded.
    #[error(
        "dataset file {file} is missing and could not be downloaded from {url} ({reason}); \
         download it yourself and put it at {file}"
    )]
    Missing {
        /// Where the file was expected.
        file: PathBuf,
        /// The public mirror it would have come from.
        url: String,
        /// Why the download failed (or that downloads are disabled).
        reason: String,
    },
    /// The file's decompressed bytes do not have the pinned SHA-256.
    #[error("{file}: SHA-256 of the decompressed bytes is {got}, expected {expected}")]
    Checksum {
        /// The file checked.
        file: PathBuf,
        /// The pinned hash.
        expected: String,
        /// The hash found.
        got: String,
    },
    /// The file does not start with the magic number of its format.
    #[error("{file}: not a valid {format} file ({detail})")]
    Format {
        /// The file read.
        file: PathBuf,
        /// `IDX`, `NPY` or `gzip`.
        format: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The file ends before the data its header announces.
    #[error("{file}: truncated: header announces {expected} data bytes, found {got}")]
    Truncated {
        /// The file read.
        file: PathBuf,
        /// Bytes the header announces.
        expected: usize,
        /// Bytes present.
        got: usize,
    },
    /// The array's shape or type is not what the caller needs.
    #[error("{file}: {detail}")]
    Shape {
        /// The file read.
        file: PathBuf,
        /// The expected and found shape or type.
        detail: String,
    },
    /// An I/O error on the file.
    #[error("{file}: {source}")]
    Io {
        /// The file involved.
        file: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl DataError {
    /// Wraps an I/O error with the file it happened on.
    pub fn io(file: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            file: file.into(),
            source,
        }
    }
}
