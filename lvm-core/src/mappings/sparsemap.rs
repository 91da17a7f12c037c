//! SparseMAP over bit vectors `y ∈ {0,1}^D`, with and without a budget `Σ y <= B`, solved by
//! the active-set method (reference §5.2–§5.4) in `f64`, one example per rayon task. Plain
//! CPU kernel: the differentiable wrapper lives in [`super::autodiff`].
//!
//! ```text
//! p* = argmax_{p ∈ Δ} η·Mp - ½ ||Mp||²,   m(y) = [y; 1 - y],   η = [s; 0]
//! ```
//!
//! The optimal marginals are `μ = clip((s + 1) / 2, 0, 1)` without a budget and the Euclidean
//! projection of `(s + 1) / 2` onto `{0 <= μ <= 1, Σ μ <= B}` with one; the distribution over
//! vertices is not unique and depends on the path from the initial vertex.
//!
//! Deviations from the original solver, each keeping the same optimum:
//! - The closed-form optimal marginals are computed first; bits whose marginal is 0 or 1 are
//!   fixed in every optimal vertex, so the active set runs on the fractional bits only, with
//!   their scores shifted into `(-1, 1)`. This is faster, keeps huge scores from destroying
//!   precision.
//! - Members whose weight ends at or below `1e-12` are dropped before `Q` is formed, so the
//!   Jacobian is that of the positive-weight active set.
//! - When the vertex just added leaves again at once with no step taken, even with a freshly
//!   computed inverse, rounding hides its gain and more iterations would only cycle: the solve
//!   stops, as converged if the optimality gap is below `1e-7`.
//! - The inverse KKT matrix is recomputed from scratch when it drifts and when the loop stalls.
//! - When a new vertex is affinely dependent on the active
//!   set, the original eigendecomposes the padded KKT matrix and drops the first element with a
//!   non-zero coefficient, which can leave weights that do not sum to one. Here the
//!   dependency `y* = Σ λ_j y_j` comes free from the bordered-inverse update, and a ratio test
//!   moves weight onto `y*` along it, keeping the marginals and feasibility.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::kbest::{BitConfigs, score_words, validate_bit_scores};
use crate::error::MappingError;

/// Optimality tolerance on `max_y <η - μ, m(y)> - τ` (reference §5.4).
const OPTIMALITY_TOL: f64 = 1e-9;
/// Below this Schur complement a new vertex counts as affinely dependent (reference §5.4).
const SINGULAR_TOL: f64 = 1e-9;
/// When the equality-constrained weights miss `Σ z = 1` by more than this, the inverse KKT
/// matrix has drifted under rank-one updates and is recomputed from scratch. Without any
/// refactoring about one solve in ten at D = 128 cycled until `max_iter`.
const DRIFT_TOL: f64 = 1e-10;
/// A stall (the vertex just added leaves at once, even with an exact inverse) counts as
/// converged when the remaining optimality gap is below this: the gain is at rounding level.
const STALL_GAP_TOL: f64 = 1e-7;
/// Active-set capacity allocated up front; it grows by doubling beyond this.
const INITIAL_CAPACITY: usize = 61;
/// Final weights at or below this are rounding residue of a member that left the optimal
/// face (seen: 1e-15 on a suboptimal vertex) and are dropped.
const ZERO_WEIGHT: f64 = 1e-12;
/// Affine coefficients smaller than this are treated as zero in the ratio test.
const COEFFICIENT_TOL: f64 = 1e-12;

/// How the active set starts (reference §5.4).
#[derive(Debug, Clone, PartialEq)]
pub enum Init {
    /// The MAP vertex of the scores.
    Map,
    /// A random vertex, as in the original: the (budget-)MAP of uniform noise `r ∈ [0,1)^2D`,
    /// uniform over all vertices without a budget (with one, the empty vertex is less likely
    /// than the others). Drawn from the ChaCha8 stream numbered by the example's row, so that
    /// results depend on the seed and the row, not on thread scheduling.
    Random {
        /// Seed of the per-example streams.
        seed: u64,
    },
    /// One given feasible vertex per example.
    Given(BitConfigs),
}

/// Solver settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseMapOptions {
    /// At most this many bits on (`None`: no budget).
    pub budget: Option<usize>,
    /// Iteration cap; the original uses 300.
    pub max_iter: usize,
    /// Initial vertex.
    pub init: Init,
}

impl Default for SparseMapOptions {
    fn default() -> Self {
        Self {
            budget: None,
            max_iter: 300,
            init: Init::Map,
        }
    }
}

/// The solver's final state for one example.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseMapSolution {
    /// The final active set: every member has positive weight (members that ended at or
    /// below `1e-12` are dropped), lifted back to all `D` bits.
    pub configs: BitConfigs,
    /// Weight of each active configuration: non-negative, summing to one.
    pub weights: Vec<f64>,
    /// `Q`: the lower-right `n × n` block of the inverse KKT matrix of the active set, row
    /// major. On a fixed active set `∂p/∂s = Q M_Sᵀ` restricted to the "on" half (§5.5).
    pub q: Vec<f64>,
    /// Iterations used.
    pub iterations: usize,
    /// Whether the optimality test passed (false: stopped at `max_iter` or on a repeat).
    pub converged: bool,
}

impl SparseMapSolution {
    /// Indices of the active configurations with positive weight.
    pub fn support(&self) -> Vec<usize> {
        (0..self.weights.len())
            .filter(|&j| self.weights[j] > 0.0)
            .collect()
    }

    /// Marginals `μ_i = Σ_j p_j y_ij`.
    pub fn marginals(&self) -> Vec<f64> {
        let mut mu = vec![0.0; self.configs.bits()];
        accumulate_marginals(&self.configs, &self.weights, &mut mu);
        mu
    }

    /// Vector–Jacobian product with respect to the scores on the final active set (§5.5).
    ///
    /// ```text
    /// ∇s_i = Σ_j y_ij (Q g)_j
    /// ```
    ///
    /// # Panics
    /// If `upstream` does not have one entry per active configuration.
    pub fn vjp(&self, upstream: &[f64]) -> Vec<f64> {
        let n = self.weights.len();
        assert_eq!(
            upstream.len(),
            n,
            "one upstream gradient per active configuration"
        );
        let qg: Vec<f64> = (0..n)
            .map(|a| (0..n).map(|c| self.q[a * n + c] * upstream[c]).sum())
            .collect();
        let mut grad = vec![0.0; self.configs.bits()];
        accumulate_marginals(&self.configs, &qg, &mut grad);
        grad
    }
}

/// `out_i += Σ_j w_j y_ij`, branch-free over each 64-bit word so that it vectorizes.
fn accumulate_marginals(configs: &BitConfigs, weights: &[f64], out: &mut [f64]) {
    for (j, &w) in weights.iter().enumerate().filter(|(_, w)| **w != 0.0) {
        for (chunk, &word) in out.chunks_mut(64).zip(configs.words_of(j)) {
            for (b, o) in chunk.iter_mut().enumerate() {
                *o += w * ((word >> b) & 1) as f64;
            }
        }
    }
}

/// Solves SparseMAP for each row of a `[rows, D]` score matrix, rows in parallel.
pub fn sparsemap(
    scores: &[f32],
    bits: usize,
    options: &SparseMapOptions,
) -> Result<Vec<SparseMapSolution>, MappingError> {
    validate_bit_scores(scores, bits)?;
    validate_options(scores.len() / bits, bits, options)?;
    Ok(scores
        .par_chunks(bits)
        .enumerate()
        .map(|(row, s)| solve_row(s, row, options))
        .collect())
}

fn validate_options(
    rows: usize,
    bits: usize,
    options: &SparseMapOptions,
) -> Result<(), MappingError> {
    if options.max_iter == 0 {
        return Err(MappingError::BadMaxIter { max_iter: 0 });
    }
    if let Some(budget) = options.budget.filter(|b| *b == 0) {
        return Err(MappingError::BadBudget { budget });
    }
    if let Init::Given(vertices) = &options.init {
        if vertices.bits() != bits || vertices.len() != rows {
            let reason = format!(
                "set has {} vectors of {} bits, expected {rows} of {bits}",
                vertices.len(),
                vertices.bits()
            );
            return Err(MappingError::BadInitialVertex { row: 0, reason });
        }
        for row in 0..rows {
            let on = vertices.count_ones(row);
            if options.budget.is_some_and(|b| on > b) {
                let reason = format!("has {on} bits on, above the budget");
                return Err(MappingError::BadInitialVertex { row, reason });
            }
        }
    }
    Ok(())
}

/// The vertex maximizing `Σ_i y_i e_i` subject to the budget (reference §5.3), where
/// `e_i = η_on,i - η_off,i`. Bits with `e_i > 0` are on; over budget, the `B` largest `e_i`
/// (ties to the smaller index) are on, stopping before the first negative one.
fn map_vertex(e: &[f64], budget: Option<usize>, order: &mut Vec<usize>, out: &mut [u64]) {
    for (word, chunk) in out.iter_mut().zip(e.chunks(64)) {
        *word = chunk
            .iter()
            .enumerate()
            .fold(0, |w, (b, &v)| w | (u64::from(v > 0.0) << b));
    }
    let positive: usize = out.iter().map(|w| w.count_ones() as usize).sum();
    if let Some(b) = budget.filter(|&b| positive > b) {
        out.fill(0);
        order.clear();
        order.extend(0..e.len());
        order.sort_by(|&a, &c| e[c].total_cmp(&e[a]).then(a.cmp(&c)));
        for &i in order.iter().take(b).take_while(|&&i| e[i] >= 0.0) {
            out[i / 64] |= 1 << (i % 64);
        }
    }
}

/// Active-set state of one example: the active vertices, their scores and weights, and the
/// inverse of the bordered KKT matrix `A = [[0, 1ᵀ], [1, G]]`, `G_jk = D - Hamming(y_j, y_k)`.
struct ActiveSet<'a> {
    s: &'a [f64],
    configs: BitConfigs,
    /// `[1, s·y_1, ..., s·y_n]`: the right-hand side of the KKT system.
    rhs: Vec<f64>,
    weights: Vec<f64>,
    /// The active vertices again, as rows of 0/1 floats (`n × D`), for the marginals.
    dense: Vec<f64>,
    /// Reused buffer for a row or column of `A⁻¹`.
    scratch: Vec<f64>,
    /// `A⁻¹ rhs`, when `solution_valid`.
    solution: Vec<f64>,
    solution_valid: bool,
    /// `A⁻¹`, `(n + 1) × (n + 1)`, row-major with row stride `stride`.
    ainv: Vec<f64>,
    stride: usize,
}

impl<'a> ActiveSet<'a> {
    fn new(s: &'a [f64], first: &[u64]) -> Self {
        let bits = s.len();
        let stride = bits.min(INITIAL_CAPACITY) + 3;
        let mut set = Self {
            s,
            configs: BitConfigs::new(bits),
            rhs: vec![1.0, score_words(first, s)],
            weights: vec![1.0],
            scratch: Vec::with_capacity(stride),
            solution: Vec::with_capacity(stride),
            solution_valid: false,
            dense: Vec::with_capacity(stride * bits),
            ainv: vec![0.0; stride * stride],
            stride,
        };
        set.push_config(first);
        // A = [[0, 1], [1, D]]  =>  A⁻¹ = [[-D, 1], [1, 0]].
        set.ainv[0] = -(bits as f64);
        set.ainv[1] = 1.0;
        set.ainv[stride] = 1.0;
        set
    }

    fn len(&self) -> usize {
        self.weights.len()
    }

    /// Makes room for an `(size + 1) × (size + 1)` inverse, doubling the row stride as needed,
    /// so that memory follows the active set rather than `D`.
    fn reserve(&mut self, size: usize) {
        if size < self.stride {
            return;
        }
        let stride = (2 * self.stride).max(size + 1);
        let mut grown = vec![0.0; stride * stride];
        let n = self.len() + 1;
        for a in 0..n {
            grown[a * stride..a * stride + n].copy_from_slice(&self.ainv[a * self.stride..][..n]);
        }
        self.ainv = grown;
        self.stride = stride;
    }

    fn push_config(&mut self, y: &[u64]) {
        self.configs.push_words(y);
        let bits = self.s.len();
        self.dense
            .extend((0..bits).map(|i| ((y[i / 64] >> (i % 64)) & 1) as f64));
    }

    /// `μ = Σ_j p_j y_j`, as dense row updates that vectorize.
    fn marginals_into(&self, mu: &mut [f64]) {
        mu.fill(0.0);
        let rows = self.dense.chunks_exact(self.s.len().max(1));
        for (row, &w) in rows.zip(&self.weights).filter(|(_, w)| **w != 0.0) {
            for (m, &y) in mu.iter_mut().zip(row) {
                *m += w * y;
            }
        }
    }

    fn at(&self, a: usize, c: usize) -> f64 {
        self.ainv[a * self.stride + c]
    }

    /// `[τ; z] = A⁻¹ [1; scores]`: the equality-constrained optimum on the active set. Kept
    /// up to date in `O(n)` across insertions; recomputed in `O(n²)` after other changes.
    fn solve(&mut self, z: &mut Vec<f64>) -> f64 {
        let (n, st) = (self.len(), self.stride);
        if !self.solution_valid {
            let rhs = &self.rhs[..=n];
            self.solution.clear();
            self.solution
                .extend((0..=n).map(|a| dot(&self.ainv[a * st..a * st + n + 1], rhs)));
            self.solution_valid = true;
        }
        z.clear();
        z.extend_from_slice(&self.solution[1..=n]);
        self.solution[0]
    }

    /// Adds `y` with weight zero. Returns `false`, changing nothing, when `y` is affinely
    /// dependent on the active set; then `d[1..]` holds its affine coefficients.
    fn try_insert(&mut self, y: &[u64], d: &mut Vec<f64>) -> bool {
        self.reserve(self.len() + 2);
        let (n, st) = (self.len(), self.stride);

        // r = [1, G(y_j, y)], s = r0 - rᵀ A⁻¹ r, d = A⁻¹ r.
        self.scratch.clear();
        self.scratch.push(1.0);
        self.scratch
            .extend((0..n).map(|j| self.configs.agreement_with(j, y) as f64));
        d.clear();
        d.extend((0..=n).map(|a| dot(&self.ainv[a * st..a * st + n + 1], &self.scratch)));
        let schur = self.s.len() as f64 - dot(&self.scratch, d);
        if schur.abs() <= SINGULAR_TOL {
            return false;
        }

        // A⁻¹ ← [[A⁻¹ + d dᵀ / s, -d / s], [-dᵀ / s, 1 / s]].
        let inv = 1.0 / schur;
        for (a, &da) in d.iter().enumerate() {
            let row = &mut self.ainv[a * st..a * st + n + 2];
            let scaled = da * inv;
            for (x, &dc) in row[..=n].iter_mut().zip(d.iter()) {
                *x += scaled * dc;
            }
            row[n + 1] = -scaled;
        }
        let last = &mut self.ainv[(n + 1) * st..(n + 1) * st + n + 2];
        for (x, &dc) in last[..=n].iter_mut().zip(d.iter()) {
            *x = -dc * inv;
        }
        last[n + 1] = inv;

        // [x; 0] ← [x + d γ; -γ] with γ = (dᵀ b - β) / s, β the new score (block inverse).
        let beta = score_words(y, self.s);
        if self.solution_valid {
            let gamma = (dot(d, &self.rhs) - beta) * inv;
            for (x, &da) in self.solution.iter_mut().zip(d.iter()) {
                *x += da * gamma;
            }
            self.solution.push(-gamma);
        }
        self.push_config(y);
        self.rhs.push(beta);
        self.weights.push(0.0);
        true
    }

    /// Removes active member `j` and downdates `A⁻¹` (row/column `k = j + 1`):
    /// `A⁻¹[a, c] -= A⁻¹[a, k] A⁻¹[k, c] / A⁻¹[k, k]`, then closes the gap in place.
    fn remove(&mut self, j: usize) {
        let (n, k, st) = (self.len(), j + 1, self.stride);
        let pivot = self.at(k, k);
        self.scratch.clear();
        self.scratch
            .extend((0..=n).map(|c| self.ainv[k * st + c] / pivot));
        for a in (0..=n).filter(|&a| a != k) {
            let factor = self.ainv[a * st + k];
            let row = &mut self.ainv[a * st..a * st + n + 1];
            for (x, &rc) in row.iter_mut().zip(&self.scratch) {
                *x -= factor * rc;
            }
        }
        for a in 0..=n {
            let base = a * st;
            self.ainv.copy_within(base + k + 1..base + n + 1, base + k);
        }
        self.ainv.copy_within((k + 1) * st..(n + 1) * st, k * st);
        self.configs.remove(j);
        let bits = self.s.len();
        self.dense.drain(j * bits..(j + 1) * bits);
        self.rhs.remove(k);
        self.weights.remove(j);
        self.solution_valid = false;
    }

    /// Brings in `y` when it is affinely dependent on the active set, `y = Σ λ_j y_j`
    /// (`Σ λ_j = 1`): moves weight `t` onto `y` along `p - t λ`, with `t` the largest step
    /// keeping `p >= 0`, so the marginals do not change; the member that hits zero leaves.
    fn exchange(&mut self, y: &[u64], lambda: &[f64]) -> bool {
        let blocking = (0..self.len())
            .filter(|&j| lambda[j] > COEFFICIENT_TOL)
            .min_by(|&a, &b| {
                (self.weights[a] / lambda[a]).total_cmp(&(self.weights[b] / lambda[b]))
            });
        let Some(out) = blocking else { return false };
        let t = self.weights[out] / lambda[out];
        for (w, l) in self.weights.iter_mut().zip(lambda) {
            *w = (*w - t * l).max(0.0);
        }
        self.remove(out);
        let mut d = Vec::new();
        if !self.try_insert(y, &mut d) {
            return false;
        }
        *self.weights.last_mut().expect("just inserted") = t;
        true
    }

    /// Recomputes `A⁻¹` from scratch by Gauss–Jordan elimination with partial pivoting,
    /// discarding the rounding error that the rank-one updates accumulate.
    fn refactor(&mut self) {
        self.solution_valid = false;
        let (n, st) = (self.len() + 1, self.stride);
        let w = 2 * n;
        let mut m = vec![0.0; n * w];
        for a in 0..n {
            for c in 0..n {
                m[a * w + c] = match (a, c) {
                    (0, 0) => 0.0,
                    (0, _) | (_, 0) => 1.0,
                    _ => self.configs.agreement(a - 1, c - 1) as f64,
                };
            }
            m[a * w + n + a] = 1.0;
        }
        for col in 0..n {
            let pivot = (col..n)
                .max_by(|&x, &y| m[x * w + col].abs().total_cmp(&m[y * w + col].abs()))
                .expect("non-empty range");
            for c in 0..w {
                m.swap(col * w + c, pivot * w + c);
            }
            let inv = 1.0 / m[col * w + col];
            for c in 0..w {
                m[col * w + c] *= inv;
            }
            for r in (0..n).filter(|&r| r != col) {
                let f = m[r * w + col];
                if f != 0.0 {
                    for c in 0..w {
                        m[r * w + c] -= f * m[col * w + c];
                    }
                }
            }
        }
        for a in 0..n {
            self.ainv[a * st..a * st + n].copy_from_slice(&m[a * w + n..a * w + 2 * n]);
        }
    }

    fn q_block(&self) -> Vec<f64> {
        let n = self.len();
        (1..=n)
            .flat_map(|a| (1..=n).map(move |c| (a, c)))
            .map(|(a, c)| self.at(a, c))
            .collect()
    }
}

/// The problem left once the integral marginals are fixed: the closed-form optimum `μ*` says
/// which bits are on or off in every optimal vertex, so only the fractional ones are solved.
struct Reduced {
    /// Indices of the fractional bits.
    free: Vec<usize>,
    /// Bits that are on in every optimal vertex, packed over all `D` bits.
    ones: Vec<u64>,
    /// Shifted scores of the free bits, `s_F - 2θ`, all in `(-1, 1)`.
    scores: Vec<f64>,
    /// Budget left for the free bits (`None` when it cannot bind).
    budget: Option<usize>,
}

/// Closed-form optimal marginals (reference §5.2) and the reduction they allow.
///
/// ```text
/// v = (s + 1) / 2,   μ* = clip(v - θ, 0, 1),   θ = 0 if Σ clip(v, 0, 1) <= B,
///                                              else Σ clip(v - θ, 0, 1) = B
/// ```
///
/// On the free bits the budget, if binding, holds with equality, so shifting their scores by
/// `-2θ` leaves the optimal marginals unchanged and puts every score in `(-1, 1)`.
fn reduce(s: &[f32], budget: Option<usize>) -> Reduced {
    let v: Vec<f64> = s.iter().map(|&x| (f64::from(x) + 1.0) / 2.0).collect();
    let theta = budget.map_or(0.0, |b| capped_simplex_shift(&v, b));
    let mut reduced = Reduced {
        free: Vec::new(),
        ones: vec![0; s.len().div_ceil(64)],
        scores: Vec::new(),
        budget,
    };
    let mut ones = 0;
    for (i, &vi) in v.iter().enumerate() {
        let mu = vi - theta;
        if mu >= 1.0 {
            reduced.ones[i / 64] |= 1 << (i % 64);
            ones += 1;
        } else if mu > 0.0 {
            reduced.free.push(i);
            reduced.scores.push(f64::from(s[i]) - 2.0 * theta);
        }
    }
    reduced.budget = budget
        .map(|b| b.saturating_sub(ones))
        .filter(|b| *b < reduced.free.len());
    reduced
}

/// The `θ >= 0` of the capped-simplex projection: 0 if `Σ clip(v, 0, 1) <= B`, else the root of
/// the piecewise-linear, decreasing `Σ clip(v - θ, 0, 1) - B`, found exactly by locating its
/// linear piece among the sorted kinks (no bisection, so huge scores keep full precision).
fn capped_simplex_shift(v: &[f64], budget: usize) -> f64 {
    let b = budget as f64;
    let mass = |theta: f64| v.iter().map(|x| (x - theta).clamp(0.0, 1.0)).sum::<f64>();
    if mass(0.0) <= b {
        return 0.0;
    }

    // The mass is continuous, non-increasing and linear between the kinks v_i - 1 and v_i:
    // find the last kink where it still exceeds B, then solve on the linear piece after it.
    let mut kinks: Vec<f64> = v
        .iter()
        .flat_map(|&x| [x - 1.0, x])
        .filter(|&t| t > 0.0)
        .collect();
    kinks.sort_by(f64::total_cmp);
    kinks.dedup();
    let after = kinks.partition_point(|&t| mass(t) > b);
    let lo = if after == 0 { 0.0 } else { kinks[after - 1] };
    let mid = kinks.get(after).map_or(lo + 0.5, |&hi| 0.5 * (lo + hi));
    let fractional = v
        .iter()
        .filter(|&&x| (0.0..1.0).contains(&(x - mid)) && x > mid)
        .count();
    if fractional == 0 {
        return lo;
    }
    lo + (mass(lo) - b) / fractional as f64
}

/// The initial vertex of example `row` on the free bits, as packed words.
fn initial_vertex(reduced: &Reduced, row: usize, options: &SparseMapOptions) -> Vec<u64> {
    let bits = reduced.free.len();
    let mut out = vec![0u64; bits.div_ceil(64)];
    let mut order = Vec::new();
    let e: Vec<f64> = match &options.init {
        Init::Map => reduced.scores.clone(),
        Init::Random { seed } => {
            let mut rng = ChaCha8Rng::seed_from_u64(*seed);
            rng.set_stream(row as u64);
            (0..bits)
                .map(|_| rng.random::<f64>() - rng.random::<f64>())
                .collect()
        }
        // The given vertex restricted to the free bits; over the remaining budget, its
        // lowest-index bits are kept.
        Init::Given(vertices) => reduced
            .free
            .iter()
            .map(|&i| if vertices.get(row, i) { 1.0 } else { -1.0 })
            .collect(),
    };
    map_vertex(&e, reduced.budget, &mut order, &mut out);
    out
}

/// One example: reduce to the fractional bits, run the active set there, keep the members
/// with positive weight, and lift the vertices back to all `D` bits.
fn solve_row(s: &[f32], row: usize, options: &SparseMapOptions) -> SparseMapSolution {
    let reduced = reduce(s, options.budget);
    if reduced.free.is_empty() {
        let mut configs = BitConfigs::new(s.len());
        configs.push_words(&reduced.ones);
        return SparseMapSolution {
            configs,
            weights: vec![1.0],
            q: vec![0.0],
            iterations: 0,
            converged: true,
        };
    }
    let first = initial_vertex(&reduced, row, options);
    let (mut set, iterations, converged) =
        active_set(&reduced.scores, reduced.budget, &first, options.max_iter);

    // Members at zero weight (up to rounding) leave, and Q is recomputed for those that stay.
    let dropped: Vec<usize> = (0..set.len())
        .rev()
        .filter(|&j| set.weights[j] <= ZERO_WEIGHT)
        .collect();
    if !dropped.is_empty() {
        dropped.into_iter().for_each(|j| set.remove(j));
        set.refactor();
    }
    let mut configs = BitConfigs::new(s.len());
    let mut full = reduced.ones.clone();
    for j in 0..set.len() {
        full.copy_from_slice(&reduced.ones);
        for (k, &i) in reduced.free.iter().enumerate() {
            if set.configs.get(j, k) {
                full[i / 64] |= 1 << (i % 64);
            }
        }
        configs.push_words(&full);
    }
    let total: f64 = set.weights.iter().sum();
    let weights = set.weights.iter().map(|w| w / total).collect();
    SparseMapSolution {
        q: set.q_block(),
        configs,
        weights,
        iterations,
        converged,
    }
}

/// The active-set loop of reference §5.4 on scores `s` (already reduced).
fn active_set<'a>(
    s: &'a [f64],
    budget: Option<usize>,
    first: &[u64],
    max_iter: usize,
) -> (ActiveSet<'a>, usize, bool) {
    let bits = s.len();
    let mut set = ActiveSet::new(s, first);
    let (mut tau, mut changed, mut converged) = (0.0, true, false);
    let (mut mu, mut e) = (vec![0.0; bits], vec![0.0; bits]);
    let (mut candidate, mut order, mut d) = (vec![0u64; bits.div_ceil(64)], Vec::new(), Vec::new());
    let (mut iterations, mut fresh, mut z) = (0, false, Vec::with_capacity(bits + 2));
    let mut just_inserted = false;
    let mut last_gap = 0.0;

    while iterations < max_iter {
        iterations += 1;
        if changed {
            tau = set.solve(&mut z);
            // Rank-one updates drift; the constraint Σ z = 1 shows it, so refactor then.
            if (z.iter().sum::<f64>() - 1.0).abs() > DRIFT_TOL {
                set.refactor();
                fresh = true;
                tau = set.solve(&mut z);
            }
            let blocked = step_towards(&mut set, &z);
            // The vertex just added leaving again at once, with no step taken, means rounding
            // has made its gain invisible to the KKT solve: more iterations would only cycle.
            if blocked.is_some_and(|(j, alpha)| just_inserted && j == set.len() && alpha == 0.0) {
                if fresh {
                    converged = last_gap <= STALL_GAP_TOL;
                    break;
                }
                set.refactor();
                fresh = true;
                just_inserted = false;
                changed = true;
                continue;
            }
            changed = blocked.is_some();
            just_inserted = false;
            continue;
        }

        // μ = Σ p_j y_j;  e_i = (s_i - μ_i) - (0 - (1 - μ_i)) = s_i + 1 - 2 μ_i.
        set.marginals_into(&mut mu);
        for ((e, &si), &m) in e.iter_mut().zip(s).zip(&mu) {
            *e = si + 1.0 - 2.0 * m;
        }
        map_vertex(&e, budget, &mut order, &mut candidate);

        // v = <η - μ, m(y*)> = Σ_i -(1 - μ_i) + Σ_{i on} e_i.
        let value = mu.iter().map(|m| m - 1.0).sum::<f64>() + score_words(&candidate, &e);
        last_gap = value - tau;
        if value <= tau + OPTIMALITY_TOL {
            converged = true;
            break;
        }
        // A repeat, or a failed exchange, means the inverse has drifted: refactor once and
        // retry before giving up (the original gives up at once).
        let repeat = (0..set.len()).any(|j| set.configs.words_of(j) == candidate.as_slice());
        let moved = !repeat
            && (set.try_insert(&candidate, &mut d) || {
                let lambda = d[1..].to_vec();
                set.exchange(&candidate, &lambda)
            });
        if !moved {
            if fresh {
                break;
            }
            set.refactor();
        }
        fresh = !moved;
        just_inserted = moved;
        changed = true;
    }
    (set, iterations, converged)
}

/// `Σ_i a_i b_i` over the shorter of the two slices, with four independent accumulators so
/// that the additions do not wait on one another (a plain fold is latency-bound).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f64; 4];
    let (head_a, tail_a) = a.split_at(n - n % 4);
    let (head_b, tail_b) = b.split_at(n - n % 4);
    for (x, y) in head_a.chunks_exact(4).zip(head_b.chunks_exact(4)) {
        for lane in 0..4 {
            acc[lane] += x[lane] * y[lane];
        }
    }
    let tail: f64 = tail_a.iter().zip(tail_b).map(|(x, y)| x * y).sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Moves the weights towards the equality-constrained optimum `z` (reference §5.4, step 3).
/// Returns the member that blocked and left, with the step length taken, if one did.
fn step_towards(set: &mut ActiveSet<'_>, z: &[f64]) -> Option<(usize, f64)> {
    // α_j = p_j / (p_j - z_j) over members with z_j < p_j; the first strict minimum blocks.
    let mut blocking: Option<(usize, f64)> = None;
    let mut any_negative = false;
    for (j, (&p, &zj)) in set.weights.iter().zip(z).enumerate() {
        if zj < p {
            any_negative |= zj < 0.0;
            let alpha = p / (p - zj);
            if blocking.is_none_or(|(_, best)| alpha < best) {
                blocking = Some((j, alpha));
            }
        }
    }
    match blocking {
        Some((j, alpha)) if any_negative => {
            let alpha = alpha.min(1.0);
            for (p, &zj) in set.weights.iter_mut().zip(z) {
                *p = if alpha == 1.0 {
                    zj
                } else {
                    ((1.0 - alpha) * *p + alpha * zj).max(0.0)
                };
            }
            set.remove(j);
            Some((j, alpha))
        }
        _ => {
            set.weights.copy_from_slice(z);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Normal};

    use super::*;

    /// Independent reference for the budgeted marginals: the Euclidean projection of
    /// `v = (s + 1) / 2` onto `{0 <= μ <= 1, Σ μ <= B}` is `clip(v - θ, 0, 1)` with `θ = 0` if
    /// that already fits, else the `θ > 0` with `Σ clip(v - θ) = B`, found here by bisection.
    fn capped_projection(s: &[f32], budget: Option<usize>) -> Vec<f64> {
        let v: Vec<f64> = s.iter().map(|&x| (f64::from(x) + 1.0) / 2.0).collect();
        let at =
            |theta: f64| -> Vec<f64> { v.iter().map(|x| (x - theta).clamp(0.0, 1.0)).collect() };
        let Some(b) = budget else { return at(0.0) };
        if at(0.0).iter().sum::<f64>() <= b as f64 {
            return at(0.0);
        }
        let (mut lo, mut hi) = (0.0, v.iter().copied().fold(0.0, f64::max));
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if at(mid).iter().sum::<f64>() > b as f64 {
                lo = mid
            } else {
                hi = mid
            }
        }
        at(0.5 * (lo + hi))
    }

    /// The SparseMAP objective `s·μ - ½ Σ_i (μ_i² + (1 - μ_i)²)` of a distribution.
    fn objective(s: &[f32], mu: &[f64]) -> f64 {
        s.iter()
            .zip(mu)
            .map(|(&si, &m)| f64::from(si) * m - 0.5 * (m * m + (1.0 - m) * (1.0 - m)))
            .sum()
    }

    /// Brute-force optimum over all `2^D` vertices: the objective depends on `p` only through
    /// `μ`, so a projected-gradient solve over `μ` in the feasible polytope is exact; here it
    /// is checked the other way round: no vertex improves the linearization at `μ`
    /// (`max_y <η - μ, m(y)> <= τ`), enumerating every feasible `y`.
    fn brute_force_optimality_gap(
        s: &[f32],
        sol: &SparseMapSolution,
        budget: Option<usize>,
    ) -> f64 {
        let d = s.len();
        let mu = sol.marginals();
        // τ = <η - μ, m(y_j)> for any member of the support.
        let value = |y: u64| -> f64 {
            (0..d)
                .map(|i| {
                    if y >> i & 1 == 1 {
                        f64::from(s[i]) - mu[i]
                    } else {
                        mu[i] - 1.0
                    }
                })
                .sum()
        };
        let tau = value(sol.configs.words_of(sol.support()[0])[0]);
        (0..1u64 << d)
            .filter(|y| budget.is_none_or(|b| y.count_ones() as usize <= b))
            .map(value)
            .fold(f64::NEG_INFINITY, f64::max)
            - tau
    }

    fn normal_scores(rng: &mut ChaCha8Rng, rows: usize, d: usize, sigma: f32) -> Vec<f32> {
        let normal = Normal::new(0.0f32, sigma).unwrap();
        (0..rows * d).map(|_| normal.sample(rng)).collect()
    }

    fn check_solution(s: &[f32], sol: &SparseMapSolution, budget: Option<usize>) {
        let d = s.len();
        assert!(
            sol.converged,
            "not converged after {} iterations",
            sol.iterations
        );
        assert!(sol.weights.iter().all(|w| *w >= 0.0));
        assert!((sol.weights.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(sol.support().len() <= d + 1);
        for j in 0..sol.configs.len() {
            assert!(budget.is_none_or(|b| sol.configs.count_ones(j) <= b));
        }
        for (got, want) in sol.marginals().iter().zip(capped_projection(s, budget)) {
            assert!(
                (got - want).abs() < 1e-5,
                "marginal {got} vs {want} (s = {s:?})"
            );
        }
    }

    #[test]
    fn marginals_equal_the_closed_form_with_and_without_budget() {
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        for (d, sigma, budget) in [
            (3, 1.0, None),
            (8, 1.0, None),
            (32, 1.0, None),
            (32, 4.0, None),
            (128, 1.0, None),
            (8, 1.0, Some(3)),
            (32, 1.0, Some(16)),
            (32, 2.0, Some(4)),
            (128, 1.0, Some(64)),
            (64, 3.0, Some(1)),
        ] {
            for init in [Init::Map, Init::Random { seed: 9 }] {
                let scores = normal_scores(&mut rng, 20, d, sigma);
                let options = SparseMapOptions {
                    budget,
                    max_iter: 2000,
                    init,
                };
                for (s, sol) in scores
                    .chunks(d)
                    .zip(sparsemap(&scores, d, &options).unwrap())
                {
                    check_solution(s, &sol, budget);
                }
            }
        }
    }

    #[test]
    fn optimal_against_every_vertex_for_small_d() {
        let mut rng = ChaCha8Rng::seed_from_u64(23);
        for d in 1usize..=8 {
            for budget in [None, Some(1), Some(d.div_ceil(2))] {
                let scores = normal_scores(&mut rng, 10, d, 1.5);
                let options = SparseMapOptions {
                    budget,
                    max_iter: 1000,
                    init: Init::Random { seed: 1 },
                };
                for (s, sol) in scores
                    .chunks(d)
                    .zip(sparsemap(&scores, d, &options).unwrap())
                {
                    check_solution(s, &sol, budget);
                    let gap = brute_force_optimality_gap(s, &sol, budget);
                    assert!(gap <= 1e-9, "gap {gap} s={s:?} b={budget:?}");
                    // And the objective equals the best objective over a fine check: the
                    // closed-form projection's objective.
                    let best = objective(s, &capped_projection(s, budget));
                    assert!((objective(s, &sol.marginals()) - best).abs() < 1e-9);
                }
            }
        }
    }

    #[test]
    fn exchange_keeps_marginals_when_a_vertex_is_affinely_dependent() {
        // Active {000, 100, 010} with p = (0.2, 0.5, 0.3), μ = (0.5, 0.3, 0). The vertex 110 =
        // 100 + 010 - 000 is affinely dependent (λ = (-1, 1, 1)); the ratio test gives
        // t = min(0.5 / 1, 0.3 / 1) = 0.3, so 010 leaves and p becomes 000: 0.5, 100: 0.2,
        // 110: 0.3, with the same marginals (computed by hand).
        let s = [0.0f64; 3];
        let word = |bits: &[u64]| bits.iter().enumerate().fold(0u64, |w, (i, b)| w | b << i);
        let mut set = ActiveSet::new(&s, &[word(&[0, 0, 0])]);
        let mut d = Vec::new();
        assert!(set.try_insert(&[word(&[1, 0, 0])], &mut d));
        assert!(set.try_insert(&[word(&[0, 1, 0])], &mut d));
        set.weights = vec![0.2, 0.5, 0.3];
        let y = [word(&[1, 1, 0])];
        assert!(!set.try_insert(&y, &mut d), "110 is affinely dependent");
        for (got, want) in d[1..].iter().zip([-1.0, 1.0, 1.0]) {
            assert!((got - want).abs() < 1e-12, "λ = {:?}", &d[1..]);
        }
        let lambda = d[1..].to_vec();
        assert!(set.exchange(&y, &lambda));
        let members: Vec<Vec<u8>> = (0..set.len()).map(|j| set.configs.to_u8(j)).collect();
        assert_eq!(members, vec![vec![0, 0, 0], vec![1, 0, 0], vec![1, 1, 0]]);
        for (got, want) in set.weights.iter().zip([0.5, 0.2, 0.3]) {
            assert!((got - want).abs() < 1e-12, "{:?}", set.weights);
        }
        // The updated inverse equals one computed from scratch.
        let updated = set.ainv.clone();
        set.refactor();
        let n = set.len() + 1;
        for a in 0..n {
            for c in 0..n {
                let (x, y) = (updated[a * set.stride + c], set.ainv[a * set.stride + c]);
                assert!((x - y).abs() < 1e-9, "A⁻¹[{a},{c}]: {x} vs {y}");
            }
        }
    }

    #[test]
    fn budget_shift_is_exact_with_huge_scores() {
        // s = [1e31, 0.5, 0.4, 0.3], B = 2: bit 0 is on; the other three share one unit of
        // budget: v = [.75, .7, .65] - θ summing to 1 gives θ = 1.1 / 3, so
        // μ = [1, 0.3833.., 0.3333.., 0.2833..].
        let s = [1e31f32, 0.5, 0.4, 0.3];
        let options = SparseMapOptions {
            budget: Some(2),
            ..Default::default()
        };
        let sol = sparsemap(&s, 4, &options).unwrap().remove(0);
        let theta = 1.1 / 3.0;
        let expected = [1.0, 0.75 - theta, 0.7 - theta, 0.65 - theta];
        for (got, want) in sol.marginals().iter().zip(expected) {
            assert!((got - want).abs() < 1e-7, "{got} vs {want}");
        }
        assert!(sol.converged);
    }

    #[test]
    fn given_init_over_the_remaining_budget_keeps_its_lowest_bits() {
        // s = [2, 0.2, 0.1, 0, -0.1], B = 2: bit 0 is fixed on, one unit of budget remains for
        // the free bits 1..4. The given vertex 0 1 1 0 0 is feasible but has two free bits on;
        // the reduction keeps bit 1 only, and the solve still reaches the optimum.
        let s = [2.0f32, 0.2, 0.1, 0.0, -0.1];
        let mut given = BitConfigs::new(5);
        given.push_bools(&[false, true, true, false, false]);
        let free = reduce(&s, Some(2));
        let options = SparseMapOptions {
            budget: Some(2),
            max_iter: 100,
            init: Init::Given(given),
        };
        assert_eq!(free.free, vec![1, 2, 3, 4]);
        assert_eq!(initial_vertex(&free, 0, &options), vec![0b0001]);
        let sol = sparsemap(&s, 5, &options).unwrap().remove(0);
        check_solution(&s, &sol, Some(2));
    }

    #[test]
    fn map_init_starts_at_the_map_and_given_init_is_honoured() {
        // Scores far outside [-1, 1]: the optimum is the MAP vertex itself, found at once.
        let s = [3.0f32, -2.0, 5.0, -4.0];
        let sol = sparsemap(&s, 4, &SparseMapOptions::default())
            .unwrap()
            .remove(0);
        assert_eq!(sol.support(), vec![0]);
        assert_eq!(sol.configs.to_u8(0), vec![1, 0, 1, 0]);
        let mut given = BitConfigs::new(4);
        given.push_bools(&[false, true, false, true]);
        let options = SparseMapOptions {
            init: Init::Given(given),
            ..Default::default()
        };
        let sol = sparsemap(&s, 4, &options).unwrap().remove(0);
        assert_eq!(sol.marginals(), vec![1.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn refuses_bad_options() {
        let s = [0.0f32; 4];
        let opts = |budget, max_iter| SparseMapOptions {
            budget,
            max_iter,
            init: Init::Map,
        };
        assert_eq!(
            sparsemap(&s, 4, &opts(Some(0), 10)),
            Err(MappingError::BadBudget { budget: 0 })
        );
        assert_eq!(
            sparsemap(&s, 4, &opts(None, 0)),
            Err(MappingError::BadMaxIter { max_iter: 0 })
        );
        let mut given = BitConfigs::new(4);
        given.push_bools(&[true, true, true, false]);
        let options = SparseMapOptions {
            budget: Some(2),
            max_iter: 10,
            init: Init::Given(given),
        };
        assert!(matches!(
            sparsemap(&s, 4, &options),
            Err(MappingError::BadInitialVertex { row: 0, .. })
        ));
        assert!(matches!(
            sparsemap(&[f32::NAN], 1, &opts(None, 5)),
            Err(MappingError::NonFiniteBitScore { .. })
        ));
    }

    #[test]
    fn weight_jacobian_matches_finite_differences_on_a_stable_active_set() {
        let mut rng = ChaCha8Rng::seed_from_u64(29);
        let d = 6;
        let mut checked = 0;
        let solver_checked = std::cell::Cell::new(0);
        for budget in [None, Some(2)] {
            for _ in 0..40 {
                let s = normal_scores(&mut rng, 1, d, 0.6);
                let options = SparseMapOptions {
                    budget,
                    max_iter: 1000,
                    init: Init::Map,
                };
                let sol = sparsemap(&s, d, &options).unwrap().remove(0);
                // Stable: every weight clearly positive and every marginal clearly fractional
                // or clearly clipped, so a small perturbation keeps the active set.
                let stable = sol.weights.iter().all(|w| *w > 1e-3)
                    && sol.marginals().iter().all(|m| {
                        (m.abs() > 1e-3 || *m == 0.0) && ((1.0 - m).abs() > 1e-3 || *m == 1.0)
                    });
                if !stable {
                    continue;
                }
                checked += 1;
                let h = 1e-3f32;
                for i in 0..d {
                    // The weights of the same configurations at s ± h e_i: from the solver
                    // itself when its active set did not change, else from the optimum on the
                    // fixed set, solved from scratch by Gaussian elimination.
                    let weights_at = |delta: f32| -> Vec<f64> {
                        let mut t = s.clone();
                        t[i] += delta;
                        let again = sparsemap(&t, d, &options).unwrap().remove(0);
                        if again.configs == sol.configs {
                            solver_checked.set(solver_checked.get() + 1);
                            return again.weights;
                        }
                        weights_on(&t, &sol, budget)
                    };
                    let (plus, minus) = (weights_at(h), weights_at(-h));
                    for j in 0..sol.weights.len() {
                        let mut upstream = vec![0.0; sol.weights.len()];
                        upstream[j] = 1.0;
                        let analytic = sol.vjp(&upstream)[i];
                        let fd = (plus[j] - minus[j]) / (2.0 * f64::from(h));
                        assert!(
                            (analytic - fd).abs() < 1e-3,
                            "dp_{j}/ds_{i}: {analytic} vs {fd}"
                        );
                    }
                }
            }
        }
        assert!(checked > 10, "too few stable cases ({checked})");
        assert!(
            solver_checked.get() > 50,
            "solver re-runs kept the set only {solver_checked:?}"
        );
    }

    /// Weights of `sol`'s configurations at new scores `t`, from the equality-constrained
    /// optimum on that fixed set, computed from scratch by Gaussian elimination.
    fn weights_on(t: &[f32], sol: &SparseMapSolution, _budget: Option<usize>) -> Vec<f64> {
        let n = sol.weights.len();
        let m = n + 1;
        let mut a = vec![0.0; m * (m + 1)];
        for r in 0..m {
            for c in 0..m {
                a[r * (m + 1) + c] = match (r, c) {
                    (0, 0) => 0.0,
                    (0, _) | (_, 0) => 1.0,
                    _ => sol.configs.agreement(r - 1, c - 1) as f64,
                };
            }
            a[r * (m + 1) + m] = if r == 0 {
                1.0
            } else {
                sol.configs.score(r - 1, t)
            };
        }
        gaussian_solve(&mut a, m)[1..].to_vec()
    }

    fn gaussian_solve(a: &mut [f64], m: usize) -> Vec<f64> {
        let w = m + 1;
        for col in 0..m {
            let pivot = (col..m)
                .max_by(|&x, &y| a[x * w + col].abs().total_cmp(&a[y * w + col].abs()))
                .unwrap();
            for c in 0..w {
                a.swap(col * w + c, pivot * w + c);
            }
            for r in (0..m).filter(|&r| r != col) {
                let f = a[r * w + col] / a[col * w + col];
                for c in 0..w {
                    a[r * w + c] -= f * a[col * w + c];
                }
            }
        }
        (0..m).map(|r| a[r * w + m] / a[r * w + r]).collect()
    }

    proptest! {
        #[test]
        fn invariants_hold_on_adversarial_scores(
            s in prop::collection::vec(
                prop_oneof![-3.0f32..3.0, Just(0.0f32), Just(1.0f32), Just(-1.0f32),
                            Just(1e6f32), Just(-1e6f32), Just(1e-7f32)],
                1..10,
            ),
            budget in prop::option::of(1usize..6),
            random in any::<bool>(),
        ) {
            let d = s.len();
            let init = if random { Init::Random { seed: 3 } } else { Init::Map };
            let options = SparseMapOptions { budget, max_iter: 1000, init };
            let sol = sparsemap(&s, d, &options).unwrap().remove(0);
            check_solution(&s, &sol, budget);
        }
    }
}
