//! Shannon entropy of sparse distributions (reference §1): exact zeros contribute exactly 0 to
//! the value and to the gradient, so a sparse output never produces `0 · log 0 = NaN`. The CPU
//! kernel is here; the tensor form is [`super::autodiff::entropy`].

/// Clamp bound of the entropy helper: machine epsilon of `f32` (reference §1).
pub const ENTROPY_EPS: f32 = f32::EPSILON;

/// Entropy of one distribution, over its positive entries only.
///
/// ```text
/// H(p) = - Σ_{j : p_j > 0} p̃_j log p̃_j,   p̃_j = clamp(p_j, ε, 1 - ε)
/// ```
pub fn entropy_row(probs: &[f32]) -> f64 {
    let eps = f64::from(ENTROPY_EPS);
    -probs
        .iter()
        .filter(|p| **p > 0.0)
        .map(|&p| {
            let p = f64::from(p).clamp(eps, 1.0 - eps);
            p * p.ln()
        })
        .sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_contribute_nothing_and_uniform_gives_log_k() {
        assert!((entropy_row(&[0.25; 4]) - 4f64.ln()).abs() < 1e-7);
        assert!((entropy_row(&[0.5, 0.0, 0.5, 0.0]) - 2f64.ln()).abs() < 1e-7);
        // A one-hot row: p̃ = 1 - ε, so H = -(1 - ε) ln(1 - ε) ≈ ε, not NaN.
        let h = entropy_row(&[0.0, 1.0, 0.0]);
        assert!((0.0..1e-6).contains(&h));
    }
}
