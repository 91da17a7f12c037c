//! Errors of the sparse mappings: every way an input from outside can be unusable, with the
//! offending value in a field. Broken shape contracts between our own modules panic instead
//! (documented under `# Panics`), because they are bugs, not bad input.

use thiserror::Error;

/// Why a sparse mapping refused its input.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum MappingError {
    /// A score was NaN or `+inf`; only finite values and `-inf` (a masked category) are allowed.
    #[error("row {row}, column {col}: score {value} is not finite (only -inf may mask an entry)")]
    NonFiniteScore {
        /// Row (example) index.
        row: usize,
        /// Column (category or bit) index.
        col: usize,
        /// The offending value.
        value: f32,
    },
    /// A bit score was NaN or infinite; bit scores cannot be masked.
    #[error("row {row}, bit {col}: score {value} is not finite (bit scores must be finite)")]
    NonFiniteBitScore {
        /// Row (example) index.
        row: usize,
        /// Bit index.
        col: usize,
        /// The offending value.
        value: f32,
    },
    /// `k` is valid but more configurations than the oracle will enumerate.
    #[error("k = {k} is too large: at most {max} configurations are enumerated per example")]
    KTooLarge {
        /// The requested number of configurations.
        k: usize,
        /// The limit.
        max: usize,
    },
    /// A tensor that must be finite holds NaN or an infinity.
    #[error("{what}: entry {index} is {value}, expected a finite value")]
    NonFiniteInput {
        /// Which input.
        what: &'static str,
        /// Flat index of the first bad entry.
        index: usize,
        /// The offending value.
        value: f32,
    },
    /// Every entry of a row was `-inf`, so no distribution over it exists.
    #[error("row {row}: every score is -inf, so there is no category to put mass on")]
    AllMasked {
        /// Row (example) index.
        row: usize,
    },
    /// A row had no entries at all.
    #[error("scores have no columns: a distribution needs at least one category or bit")]
    Empty,
    /// Rows of different lengths, or a flat buffer that is not a multiple of the row length.
    #[error("row {row} has {got} entries, expected {expected}")]
    Ragged {
        /// Row (example) index.
        row: usize,
        /// Entries found.
        got: usize,
        /// Entries expected (the first row's length).
        expected: usize,
    },
    /// The sparsemax-loss target was outside `0..K` or pointed at a masked entry.
    #[error(
        "row {row}: target {target} is not a valid class (K = {classes}, masked classes excluded)"
    )]
    BadTarget {
        /// Row (example) index.
        row: usize,
        /// The target class.
        target: usize,
        /// Number of classes K.
        classes: usize,
    },
    /// One target per row is needed.
    #[error("{targets} targets given for {rows} rows")]
    TargetCount {
        /// Targets given.
        targets: usize,
        /// Rows of scores.
        rows: usize,
    },
    /// `k` must satisfy `1 <= k <= 2^D`.
    #[error("k = {k} is invalid for {bits} bits (expected 1 <= k <= 2^{bits})")]
    BadK {
        /// The requested number of configurations.
        k: usize,
        /// The number of bits D.
        bits: usize,
    },
    /// A budget must allow at least one bit on.
    #[error("budget {budget} is invalid (expected at least 1 bit on; use no budget for none)")]
    BadBudget {
        /// The requested budget.
        budget: usize,
    },
    /// The maximum number of active-set iterations must be positive.
    #[error("max_iter must be at least 1, got {max_iter}")]
    BadMaxIter {
        /// The requested iteration cap.
        max_iter: usize,
    },
    /// A given initial vertex has the wrong length or breaks the budget.
    #[error("row {row}: initial vertex {reason}")]
    BadInitialVertex {
        /// Row (example) index.
        row: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The tensor's values could not be read back from the device.
    #[error("could not read tensor data: {0}")]
    TensorRead(String),
    /// NVIL was stepped without the outputs of its baseline network.
    #[error("NVIL needs the outputs of a learned baseline network; none were given")]
    MissingBaseline,
}
