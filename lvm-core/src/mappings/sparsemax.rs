//! Sparsemax over rows of a `[batch, K]` score matrix, its vector–Jacobian product and the
//! sparsemax loss, as plain CPU kernels over slices (reference §2.2, §2.4). The Burn wrappers
//! in [`super::autodiff`] build on these; nothing here knows about tensors.
//!
//! Entries equal to `-inf` are masked categories: they get probability exactly 0. A row that
//! is entirely `-inf`, or that holds NaN or `+inf`, is refused with a [`MappingError`].

use rayon::prelude::*;

use crate::error::MappingError;

/// Rows with at least this many entries in total are split over the rayon pool.
const PARALLEL_MIN_ENTRIES: usize = 1 << 14;

/// Checks that `scores` is a `[rows, k]` matrix of finite or `-inf` values with at least one
/// finite entry per row.
pub fn validate_scores(scores: &[f32], k: usize) -> Result<(), MappingError> {
    if k == 0 {
        return Err(MappingError::Empty);
    }
    if !scores.len().is_multiple_of(k) {
        let row = scores.len() / k;
        return Err(MappingError::Ragged {
            row,
            got: scores.len() % k,
            expected: k,
        });
    }
    for (row, values) in scores.chunks_exact(k).enumerate() {
        if let Some(col) = values
            .iter()
            .position(|v| v.is_nan() || *v == f32::INFINITY)
        {
            return Err(MappingError::NonFiniteScore {
                row,
                col,
                value: values[col],
            });
        }
        if values.iter().all(|v| *v == f32::NEG_INFINITY) {
            return Err(MappingError::AllMasked { row });
        }
    }
    Ok(())
}

/// Sparsemax threshold of one row, relative to its maximum: returns `(τ - max z, max z)`, so
/// that `sparsemax(z)_j = max((z_j - max z) - (τ - max z), 0)` keeps full precision even when
/// `|max z|` is huge.
///
/// Sort-based algorithm (Martins & Astudillo 2016; reference §2.2), accumulated in `f64`:
///
/// ```text
/// z_(1) >= ... >= z_(K)            (finite entries, shifted by max z)
/// k* = max { r : 1 + r z_(r) > Σ_{j<=r} z_(j) }
/// τ  = (Σ_{j<=k*} z_(j) - 1) / k*
/// ```
///
/// `scratch` is reused between rows to avoid allocation.
///
/// # Panics
/// If the row has no finite entry (callers validate first).
pub fn threshold(row: &[f32], scratch: &mut Vec<f64>) -> (f64, f64) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    assert!(max.is_finite(), "sparsemax row without a finite entry");

    // Shift by the maximum. Only entries above max - 1 can be in the support (τ >= max - 1,
    // because p_max = max - τ <= 1), so the rest, -inf included, are never sorted.
    scratch.clear();
    scratch.extend(
        row.iter()
            .map(|&v| f64::from(v) - f64::from(max))
            .filter(|&shifted| shifted > -1.0),
    );
    scratch.sort_unstable_by(|a, b| b.total_cmp(a));

    // Support size: the condition holds on a prefix of the sorted entries.
    let (mut cumsum, mut support_sum, mut support) = (0.0, 0.0, 0usize);
    for (r, &z) in scratch.iter().enumerate() {
        cumsum += z;
        if 1.0 + (r + 1) as f64 * z > cumsum {
            support = r + 1;
            support_sum = cumsum;
        } else {
            break;
        }
    }
    ((support_sum - 1.0) / support as f64, f64::from(max))
}

/// Sparsemax of one row into `out`: the Euclidean projection of `row` onto the simplex.
///
/// ```text
/// sparsemax(z) = argmin_{p in Δ^K} ||p - z||²  =  max(z - τ(z), 0)
/// ```
///
/// # Panics
/// If `out.len() != row.len()` or the row has no finite entry.
pub fn sparsemax_row(row: &[f32], out: &mut [f32], scratch: &mut Vec<f64>) {
    assert_eq!(row.len(), out.len(), "sparsemax output length");
    let (tau, max) = threshold(row, scratch);
    for (p, &z) in out.iter_mut().zip(row) {
        *p = ((f64::from(z) - max) - tau).max(0.0) as f32;
    }
}

/// Sparsemax over each row of a row-major `[rows, k]` matrix.
///
/// # Shapes
/// `scores`: `[rows * k]`; result: `[rows * k]`.
pub fn sparsemax(scores: &[f32], k: usize) -> Result<Vec<f32>, MappingError> {
    validate_scores(scores, k)?;
    let mut probs = vec![0.0f32; scores.len()];
    let rows_per_task = (PARALLEL_MIN_ENTRIES / k).max(1);
    probs
        .par_chunks_mut(k * rows_per_task)
        .zip(scores.par_chunks(k * rows_per_task))
        .for_each(|(out, rows)| {
            let mut scratch = Vec::with_capacity(k);
            for (o, r) in out.chunks_exact_mut(k).zip(rows.chunks_exact(k)) {
                sparsemax_row(r, o, &mut scratch);
            }
        });
    Ok(probs)
}

/// Vector–Jacobian product of sparsemax for one row, given its output `probs`.
///
/// ```text
/// S = { j : p_j > 0 },   v̂ = (1/|S|) Σ_{j∈S} g_j,   (∇z)_j = 1[j∈S] (g_j - v̂)
/// ```
///
/// # Panics
/// If the three slices differ in length.
pub fn sparsemax_vjp_row(probs: &[f32], upstream: &[f32], grad: &mut [f32]) {
    assert!(
        probs.len() == upstream.len() && probs.len() == grad.len(),
        "vjp lengths"
    );
    let (sum, count) = probs
        .iter()
        .zip(upstream)
        .filter(|(p, _)| **p > 0.0)
        .fold((0.0f64, 0usize), |(s, n), (_, g)| {
            (s + f64::from(*g), n + 1)
        });
    let mean = if count == 0 { 0.0 } else { sum / count as f64 };
    for ((out, &p), &g) in grad.iter_mut().zip(probs).zip(upstream) {
        *out = if p > 0.0 {
            (f64::from(g) - mean) as f32
        } else {
            0.0
        };
    }
}

/// Vector–Jacobian product of sparsemax over each row of `[rows, k]` matrices.
///
/// # Panics
/// If `probs` and `upstream` differ in length. A trailing partial row is ignored.
pub fn sparsemax_vjp(probs: &[f32], upstream: &[f32], k: usize) -> Vec<f32> {
    assert_eq!(probs.len(), upstream.len(), "vjp lengths");
    let mut grad = vec![0.0f32; probs.len()];
    for ((p, g), out) in probs
        .chunks_exact(k)
        .zip(upstream.chunks_exact(k))
        .zip(grad.chunks_exact_mut(k))
    {
        sparsemax_vjp_row(p, g, out);
    }
    grad
}

/// Sparsemax loss of one row against class `target` (reference §2.4), in `f64`.
///
/// ```text
/// L(z, y) = ½ (1 - ||p||²) + <p, z> - z_y = ½ (1 - ||p||²) + Σ_j p_j (z_j - z_y)
/// p = sparsemax(z),   ∇_z L = p - e_y
/// ```
///
/// The second form (using `Σ p = 1`) keeps full precision when `|z|` is huge. Masked entries
/// have `p_j = 0` and are left out. `L >= 0`, with equality iff `p = e_y`.
///
/// # Panics
/// If `target` is out of range or masked (callers validate first). Entries past the shorter
/// of `row` and `probs` are ignored.
pub fn sparsemax_loss_row(row: &[f32], probs: &[f32], target: usize) -> f64 {
    assert!(row[target].is_finite(), "sparsemax loss target is masked");
    let zy = f64::from(row[target]);
    let (norm2, inner) = probs.iter().zip(row).filter(|(p, _)| **p > 0.0).fold(
        (0.0f64, 0.0f64),
        |(n, i), (&p, &z)| {
            let p = f64::from(p);
            (n + p * p, i + p * (f64::from(z) - zy))
        },
    );
    0.5 * (1.0 - norm2) + inner
}

/// Checks one target per row, each a valid unmasked class.
pub fn validate_targets(scores: &[f32], k: usize, targets: &[usize]) -> Result<(), MappingError> {
    let rows = scores.len() / k;
    if targets.len() != rows {
        return Err(MappingError::TargetCount {
            targets: targets.len(),
            rows,
        });
    }
    for (row, &target) in targets.iter().enumerate() {
        if target >= k || !scores[row * k + target].is_finite() {
            return Err(MappingError::BadTarget {
                row,
                target,
                classes: k,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// Independent sparsemax: bisection on `τ` such that `Σ max(z - τ, 0) = 1`
    /// (reference §2.3), in `f64`, without sorting. The function is decreasing in `τ`, with
    /// the root in `[max z - 1, max z]`.
    fn sparsemax_bisect(row: &[f32]) -> Vec<f64> {
        let z: Vec<f64> = row.iter().map(|&v| f64::from(v)).collect();
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (mut lo, mut hi) = (max - 1.0, max);
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            let mass: f64 = z.iter().map(|v| (v - mid).max(0.0)).sum();
            if mass >= 1.0 { lo = mid } else { hi = mid }
        }
        let tau = 0.5 * (lo + hi);
        z.iter().map(|v| (v - tau).max(0.0)).collect()
    }

    fn random_rows(rng: &mut ChaCha8Rng, rows: usize, k: usize, scale: f32) -> Vec<f32> {
        (0..rows * k)
            .map(|_| rng.random_range(-1.0f32..1.0) * scale)
            .collect()
    }

    #[test]
    fn matches_bisection_on_thousands_of_random_rows() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for (k, scale) in [
            (2, 1.0),
            (5, 0.3),
            (10, 2.0),
            (50, 5.0),
            (256, 0.1),
            (7, 100.0),
        ] {
            let scores = random_rows(&mut rng, 1000, k, scale);
            let probs = sparsemax(&scores, k).unwrap();
            for (row, p) in scores.chunks(k).zip(probs.chunks(k)) {
                let expected = sparsemax_bisect(row);
                for (a, b) in p.iter().zip(&expected) {
                    assert!((f64::from(*a) - b).abs() < 1e-5, "k={k}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn golden_values_by_hand() {
        // z = [1, 0.5, -1]: support {0, 1}, τ = (1 + 0.5 - 1) / 2 = 0.25, p = [0.75, 0.25, 0].
        let p = sparsemax(&[1.0, 0.5, -1.0], 3).unwrap();
        assert_eq!(p, vec![0.75, 0.25, 0.0]);
        // All equal: uniform. A gap of exactly 1 between the top two: τ = top - 1, p = e_0.
        assert_eq!(sparsemax(&[3.0; 4], 4).unwrap(), vec![0.25; 4]);
        assert_eq!(sparsemax(&[2.0, 1.0, 0.0], 3).unwrap(), vec![1.0, 0.0, 0.0]);
    }

    #[test]
    fn masked_entries_get_zero_and_huge_magnitudes_stay_finite() {
        let p = sparsemax(&[f32::NEG_INFINITY, 0.2, 0.1, f32::NEG_INFINITY], 4).unwrap();
        assert_eq!(p[0], 0.0);
        assert_eq!(p[3], 0.0);
        assert!((p[1] - 0.55).abs() < 1e-6 && (p[2] - 0.45).abs() < 1e-6);
        let p = sparsemax(&[3e38, -3e38, 3e38 - 1e32], 3).unwrap();
        assert!(p.iter().all(|v| v.is_finite()));
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let p = sparsemax(&[1e-30, -1e-30, 0.0], 3).unwrap();
        assert!(p.iter().all(|v| (v - 1.0 / 3.0).abs() < 1e-6));
    }

    #[test]
    fn refuses_all_masked_and_non_finite_rows() {
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            sparsemax(&[0.0, 1.0, inf, inf], 2),
            Err(MappingError::AllMasked { row: 1 })
        );
        assert!(matches!(
            sparsemax(&[0.0, f32::NAN], 2),
            Err(MappingError::NonFiniteScore { row: 0, col: 1, .. })
        ));
        assert!(matches!(
            sparsemax(&[f32::INFINITY], 1),
            Err(MappingError::NonFiniteScore { .. })
        ));
        assert_eq!(sparsemax(&[], 0), Err(MappingError::Empty));
        assert!(matches!(
            sparsemax(&[0.0; 5], 2),
            Err(MappingError::Ragged { .. })
        ));
    }

    #[test]
    fn vjp_matches_central_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let k = 8;
        for _ in 0..200 {
            let row = random_rows(&mut rng, 1, k, 1.0);
            let upstream = random_rows(&mut rng, 1, k, 1.0);
            let probs = sparsemax(&row, k).unwrap();
            let grad = sparsemax_vjp(&probs, &upstream, k);
            // d/dz_j <g, sparsemax(z)> by central differences on the f64 bisection reference.
            let h = 1e-4;
            for j in 0..k {
                let shifted = |d: f32| {
                    let mut r = row.clone();
                    r[j] += d;
                    let p = sparsemax_bisect(&r);
                    p.iter()
                        .zip(&upstream)
                        .map(|(p, g)| p * f64::from(*g))
                        .sum::<f64>()
                };
                let fd = (shifted(h) - shifted(-h)) / (2.0 * f64::from(h));
                assert!(
                    (fd - f64::from(grad[j])).abs() < 2e-2,
                    "j={j}: fd {fd} vs {}",
                    grad[j]
                );
            }
        }
    }

    #[test]
    fn loss_is_zero_iff_one_hot_and_matches_hand_value() {
        // z = [1, 0.5, -1], p = [0.75, 0.25, 0]: ||p||² = 0.625, <p,z> = 0.875.
        // L(z, 1) = ½(1 - 0.625) + 0.875 - 0.5 = 0.5625.
        let row = [1.0, 0.5, -1.0];
        let p = sparsemax(&row, 3).unwrap();
        assert!((sparsemax_loss_row(&row, &p, 1) - 0.5625).abs() < 1e-7);
        let row = [5.0, 0.0, 1.0];
        let p = sparsemax(&row, 3).unwrap();
        assert_eq!(sparsemax_loss_row(&row, &p, 0), 0.0);
    }

    #[test]
    fn loss_keeps_precision_at_huge_magnitudes() {
        // z = [3e38, 3e38]: p = [½, ½], L(z, 0) = ½ (1 - ½) + ½ (0) + ½ (0) = 0.25.
        let row = [3e38f32, 3e38];
        let p = sparsemax(&row, 2).unwrap();
        assert_eq!(sparsemax_loss_row(&row, &p, 0), 0.25);
    }

    #[test]
    fn loss_gradient_is_p_minus_one_hot_by_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let k = 6;
        for trial in 0..100 {
            let row = random_rows(&mut rng, 1, k, 1.5);
            let target = trial % k;
            let p = sparsemax(&row, k).unwrap();
            for j in 0..k {
                let loss_at = |d: f32| {
                    let mut r = row.clone();
                    r[j] += d;
                    let q = sparsemax(&r, k).unwrap();
                    sparsemax_loss_row(&r, &q, target)
                };
                let fd = (loss_at(1e-3) - loss_at(-1e-3)) / 2e-3;
                let expected = f64::from(p[j]) - if j == target { 1.0 } else { 0.0 };
                assert!((fd - expected).abs() < 1e-3, "fd {fd} vs {expected}");
            }
        }
    }

    fn adversarial_value() -> impl Strategy<Value = f32> {
        prop_oneof![
            3 => -10.0f32..10.0,
            1 => Just(0.0f32),
            1 => Just(1.0f32),
            1 => prop_oneof![Just(1e30f32), Just(-1e30f32), Just(1e-30f32), Just(-3e38f32)],
            1 => Just(f32::NEG_INFINITY),
        ]
    }

    proptest! {
        #[test]
        fn probabilities_are_a_distribution_on_the_top_entries(
            row in prop::collection::vec(adversarial_value(), 1..40)
        ) {
            prop_assume!(row.iter().any(|v| v.is_finite()));
            let p = sparsemax(&row, row.len()).unwrap();
            prop_assert!(p.iter().all(|v| *v >= 0.0 && v.is_finite()));
            let total: f64 = p.iter().map(|v| f64::from(*v)).sum();
            prop_assert!((total - 1.0).abs() < 1e-5, "sum {}", total);
            // Order is preserved: a larger score never gets less mass.
            for (i, j) in (0..row.len()).flat_map(|i| (0..row.len()).map(move |j| (i, j))) {
                if row[i] > row[j] { prop_assert!(p[i] >= p[j]); }
            }
            // Where the bisection reference is well conditioned, the two agree.
            if row.iter().all(|v| v.abs() < 1e3) {
                for (a, b) in p.iter().zip(sparsemax_bisect(&row)) {
                    prop_assert!((f64::from(*a) - b).abs() < 1e-5);
                }
            }
        }

        #[test]
        fn ties_get_equal_mass(value in -5.0f32..5.0, copies in 1usize..20, rest in -5.0f32..5.0) {
            let mut row = vec![value; copies];
            row.push(rest);
            let p = sparsemax(&row, row.len()).unwrap();
            prop_assert!(p[..copies].iter().all(|v| *v == p[0]));
        }
    }
}
