//! Burn wrappers that make the CPU kernels differentiable, for any backend and device.
//!
//! Every mapping here is piecewise affine in its scores: on a fixed support (sparsemax) or
//! active set (SparseMAP) the output is an affine function `A(s)` of the input. Each wrapper
//! therefore reads the scores once, runs the exact kernel on the CPU, and returns
//!
//! ```text
//! out = value + (A(s) - detach(A(s)))
//! ```
//!
//! whose forward value is the kernel's exact output (the bracket is exactly zero) and whose
//! gradient is the exact Jacobian `∂A/∂s`, built from ordinary tensor ops that every backend's
//! autodiff already supports. No custom backward pass is needed.

use burn::tensor::{Bool, Tensor, TensorData};

use super::entropy::ENTROPY_EPS;
use super::kbest::{self, BitConfigs};
use super::sparsemap::{self as kernel, SparseMapOptions, SparseMapSolution};
use super::sparsemax as smax;
use crate::error::MappingError;

/// Reads a float tensor back as `f32` values, row-major.
pub fn read_f32<const D: usize>(tensor: &Tensor<D>) -> Result<Vec<f32>, MappingError> {
    tensor
        .to_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| MappingError::TensorRead(format!("{e:?}")))
}

/// `value + (linear - detach(linear))`: the value of `value`, the gradient of `linear`.
fn with_gradient_of<const D: usize>(value: Tensor<D>, linear: Tensor<D>) -> Tensor<D> {
    value.add(linear.clone().sub(linear.detach()))
}

fn constant<const D: usize>(values: Vec<f32>, shape: [usize; D], like: &Tensor<2>) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), &like.device())
}

/// Sparsemax over the last axis, differentiable (reference §2.2).
///
/// ```text
/// p = max(z - τ, 0),   on the support S:  p_S = z_S - (Σ_S z - 1) / |S|
/// ∂p/∂z = diag(1_S) - 1_S 1_Sᵀ / |S|
/// ```
///
/// `-inf` entries are masked categories with probability 0 and gradient 0.
///
/// # Shapes
/// `scores`: `[batch, K]` → `[batch, K]`.
pub fn sparsemax(scores: Tensor<2>) -> Result<Tensor<2>, MappingError> {
    let [rows, k] = scores.dims();
    let data = read_f32(&scores)?;
    let probs = smax::sparsemax(&data, k)?;
    let support: Vec<f32> = probs
        .iter()
        .map(|&p| f32::from(u8::from(p > 0.0)))
        .collect();
    let value = constant(probs, [rows, k], &scores);
    let mask = constant::<2>(support, [rows, k], &scores);

    // A(z) = 1_S ⊙ (z' - (Σ_S z' - 1) / |S|) with z' = z - max z (a constant shift, so the
    // same gradient), which keeps every term within 1 of zero even when |z| is near f32::MAX;
    // entries outside S (possibly -inf) are zeroed first.
    let max: Vec<f32> = data
        .chunks(k)
        .map(|row| row.iter().copied().fold(f32::NEG_INFINITY, f32::max))
        .collect();
    let outside: Tensor<2, Bool> = mask.clone().equal_elem(0.0);
    let max = constant::<2>(max, [rows, 1], &scores);
    let shifted = scores.mask_fill(outside, 0.0).sub(max.mul(mask.clone()));
    let tau = shifted
        .clone()
        .sum_dim(1)
        .sub_scalar(1.0)
        .div(mask.clone().sum_dim(1));
    Ok(with_gradient_of(value, shifted.sub(tau).mul(mask)))
}

/// Sparsemax loss per example against integer targets (reference §2.4), differentiable.
///
/// ```text
/// L(z, y) = ½ (1 - ||p||²) + <p, z> - z_y,   ∇_z L = p - e_y
/// ```
///
/// # Shapes
/// `scores`: `[batch, K]`, `targets`: `batch` → `[batch]`.
pub fn sparsemax_loss(scores: Tensor<2>, targets: &[usize]) -> Result<Tensor<1>, MappingError> {
    let [rows, k] = scores.dims();
    let data = read_f32(&scores)?;
    let probs = smax::sparsemax(&data, k)?;
    smax::validate_targets(&data, k, targets)?;

    // Value from the kernel; gradient (p - e_y) attached through a linear term in z.
    let losses: Vec<f32> = (0..rows)
        .map(|r| smax::sparsemax_loss_row(&data[r * k..][..k], &probs[r * k..][..k], targets[r]))
        .map(|l| l as f32)
        .collect();
    let mut direction = probs;
    for (r, &y) in targets.iter().enumerate() {
        direction[r * k + y] -= 1.0;
    }
    let finite: Vec<f32> = data
        .iter()
        .map(|v| f32::from(u8::from(v.is_finite())))
        .collect();
    let masked: Tensor<2, Bool> = constant::<2>(finite, [rows, k], &scores).equal_elem(0.0);
    let z = scores.clone().mask_fill(masked, 0.0);
    let linear = z
        .mul(constant(direction, [rows, k], &scores))
        .sum_dim(1)
        .reshape([rows]);
    Ok(with_gradient_of(constant(losses, [rows], &scores), linear))
}

/// Shannon entropy per row over the positive entries (reference §1), differentiable; exact
/// zeros contribute 0 to the value and the gradient.
///
/// ```text
/// H(p) = - Σ_{j : p_j > 0} p̃_j log p̃_j,   p̃ = clamp(p, ε, 1 - ε)
/// ```
///
/// # Shapes
/// `probs`: `[batch, K]` → `[batch]`.
pub fn entropy(probs: Tensor<2>) -> Tensor<1> {
    let [rows, _] = probs.dims();
    let positive = probs.clone().greater_elem(0.0).float();
    let clamped = probs.clamp(ENTROPY_EPS, 1.0 - ENTROPY_EPS);
    clamped
        .clone()
        .mul(clamped.log())
        .mul(positive)
        .sum_dim(1)
        .reshape([rows])
        .neg()
}

/// Top-k sparsemax of a batch (reference §4.4).
#[derive(Debug, Clone)]
pub struct TopKSparsemax {
    /// The k best configurations per example, best first, as 0/1 floats: `[batch, k, D]`.
    pub configs: Tensor<3>,
    /// Sparsemax over their scores, differentiable in the bit scores: `[batch, k]`.
    pub probs: Tensor<2>,
    /// Number of configurations with positive probability, per example.
    pub support: Vec<usize>,
}

/// Top-k sparsemax: sparsemax over the scores `t_j = s·z_j` of the `k` best bit vectors.
///
/// ```text
/// z_1..z_k = k-best(s),   t_j = s·z_j,   π = sparsemax(t)
/// ```
///
/// # Shapes
/// `scores`: `[batch, D]` → configs `[batch, k, D]`, probs `[batch, k]`.
pub fn topk_sparsemax(scores: Tensor<2>, k: usize) -> Result<TopKSparsemax, MappingError> {
    let [rows, bits] = scores.dims();
    let best = kbest::kbest(&read_f32(&scores)?, bits, k)?;
    let mut flat = Vec::with_capacity(rows * k * bits);
    for example in &best {
        flat.extend((0..k).flat_map(|j| example.configs.to_u8(j)).map(f32::from));
    }
    let configs = constant::<3>(flat, [rows, k, bits], &scores);

    // t_j - t_1 = (z_j - z_1)·s, recomputed with gradient: sparsemax ignores the common shift
    // t_1, and the differences stay finite where t itself could overflow f32.
    let t = relative_to_first(configs.clone(), rows, k, bits)
        .matmul(scores.unsqueeze_dim::<3>(2))
        .reshape([rows, k]);
    let probs = sparsemax(t)?;
    let support = read_f32(&probs)?
        .chunks(k)
        .map(|p| p.iter().filter(|v| **v > 0.0).count())
        .collect();
    Ok(TopKSparsemax {
        configs,
        probs,
        support,
    })
}

/// SparseMAP over bit vectors for a batch (reference §4.5, §5).
#[derive(Debug, Clone)]
pub struct SparseMapOutput {
    /// Configurations with positive weight, zero-padded to the largest support: `[batch, n, D]`.
    pub configs: Tensor<3>,
    /// Their weights, differentiable in the scores; padding has weight 0: `[batch, n]`.
    pub probs: Tensor<2>,
    /// Number of configurations with positive weight, per example.
    pub support: Vec<usize>,
    /// The solver's final state per example (active sets, weights, marginals).
    pub solutions: Vec<SparseMapSolution>,
}

/// SparseMAP, differentiable through the final active set (reference §5.5).
///
/// ```text
/// p_S = Q M_Sᵀ η + const on the active set S,   so   ∂p_j/∂s_i = Σ_c Q_jc y_ci
/// ```
///
/// # Shapes
/// `scores`: `[batch, D]` → configs `[batch, n, D]`, probs `[batch, n]`.
pub fn sparsemap(
    scores: Tensor<2>,
    options: &SparseMapOptions,
) -> Result<SparseMapOutput, MappingError> {
    let [rows, bits] = scores.dims();
    let solutions = kernel::sparsemap(&read_f32(&scores)?, bits, options)?;
    let supports: Vec<Vec<usize>> = solutions.iter().map(SparseMapSolution::support).collect();
    let width = supports.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let active = solutions.iter().map(|s| s.weights.len()).max().unwrap_or(1);

    // Positive-weight configurations and weights, padded to `width`.
    let (mut configs, mut weights) = (
        vec![0.0f32; rows * width * bits],
        vec![0.0f32; rows * width],
    );
    // Every active configuration (for t = Y s) and the rows of Q for the positive members.
    let (mut all, mut q_rows) = (
        vec![0.0f32; rows * active * bits],
        vec![0.0f32; rows * width * active],
    );
    for (r, (sol, support)) in solutions.iter().zip(&supports).enumerate() {
        write_configs(
            &sol.configs,
            support,
            &mut configs[r * width * bits..][..width * bits],
        );
        let every: Vec<usize> = (0..sol.weights.len()).collect();
        write_configs(
            &sol.configs,
            &every,
            &mut all[r * active * bits..][..active * bits],
        );
        let n = sol.weights.len();
        for (slot, &j) in support.iter().enumerate() {
            weights[r * width + slot] = sol.weights[j] as f32;
            for c in 0..n {
                q_rows[(r * width + slot) * active + c] = sol.q[j * n + c] as f32;
            }
        }
    }
    let configs = constant::<3>(configs, [rows, width, bits], &scores);
    let all = constant::<3>(all, [rows, active, bits], &scores);
    let q = constant::<3>(q_rows, [rows, width, active], &scores);

    // A(s) = Q_pos (Y - 1 y_1ᵀ) s: affine in s on the active set (Q 1 = 0 because the weights
    // sum to one, so the shift by y_1·s changes nothing but keeps f32 from overflowing).
    let t = relative_to_first(all, rows, active, bits).matmul(scores.clone().unsqueeze_dim::<3>(2));
    let linear = q.matmul(t).reshape([rows, width]);
    let probs = with_gradient_of(constant(weights, [rows, width], &scores), linear);
    let support = supports.iter().map(Vec::len).collect();
    Ok(SparseMapOutput {
        configs,
        probs,
        support,
        solutions,
    })
}

/// `Z - 1 z_1ᵀ` per example: each configuration minus the first of its example.
fn relative_to_first(configs: Tensor<3>, rows: usize, n: usize, bits: usize) -> Tensor<3> {
    let first = configs.clone().slice([0..rows, 0..1, 0..bits]);
    configs.sub(first.repeat_dim(1, n))
}

fn write_configs(configs: &BitConfigs, members: &[usize], out: &mut [f32]) {
    let bits = configs.bits();
    for (slot, &j) in members.iter().enumerate() {
        for (i, v) in out[slot * bits..][..bits].iter_mut().enumerate() {
            *v = f32::from(u8::from(configs.get(j, i)));
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::mappings::sparsemap::Init;

    fn device() -> Device {
        Device::flex().autodiff()
    }

    fn tensor(values: Vec<f32>, shape: [usize; 2]) -> Tensor<2> {
        Tensor::from_data(TensorData::new(values, shape), &device()).require_grad()
    }

    /// `∇_z <g, f(z)>` through Burn's autodiff.
    fn autodiff_vjp(
        f: impl Fn(Tensor<2>) -> Tensor<2>,
        z: &[f32],
        g: &[f32],
        shape: [usize; 2],
    ) -> Vec<f32> {
        let z = tensor(z.to_vec(), shape);
        let upstream = Tensor::<2>::from_data(TensorData::new(g.to_vec(), shape), &device());
        let grads = f(z.clone()).mul(upstream).sum().backward();
        read_f32(&z.grad(&grads).expect("gradient")).unwrap()
    }

    #[test]
    fn sparsemax_tensor_forward_is_the_kernel_and_backward_is_the_vjp() {
        let mut rng = ChaCha8Rng::seed_from_u64(41);
        let (rows, k) = (16, 9);
        let mut z: Vec<f32> = (0..rows * k)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        z[3] = f32::NEG_INFINITY;
        let g: Vec<f32> = (0..rows * k)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let kernel_p = smax::sparsemax(&z, k).unwrap();
        let p = read_f32(&sparsemax(tensor(z.clone(), [rows, k])).unwrap()).unwrap();
        assert_eq!(p, kernel_p, "forward value is exactly the kernel's");
        let grad = autodiff_vjp(|t| sparsemax(t).unwrap(), &z, &g, [rows, k]);
        let expected = smax::sparsemax_vjp(&kernel_p, &g, k);
        for (a, b) in grad.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert_eq!(grad[3], 0.0, "a masked entry gets no gradient");
    }

    #[test]
    fn huge_scores_give_finite_values_and_gradients() {
        // sparsemax([3e38, 3e38]) = [½, ½] (ties); the affine term must not overflow f32.
        let z = tensor(vec![3e38, 3e38, 1.0, 0.5], [2, 2]);
        let p = sparsemax(z.clone()).unwrap();
        assert_eq!(read_f32(&p).unwrap(), vec![0.5, 0.5, 0.75, 0.25]);
        let g = read_f32(&z.grad(&p.slice([0..2, 0..1]).sum().backward()).unwrap()).unwrap();
        assert_eq!(g, vec![0.5, -0.5, 0.5, -0.5]);
        // SparseMAP at [3e38, 3e38, 0.5]: the first two bits are fixed on, μ_3 = 0.75.
        let s = tensor(vec![3e38, 3e38, 0.5], [1, 3]);
        let out = sparsemap(s.clone(), &SparseMapOptions::default()).unwrap();
        let probs = read_f32(&out.probs).unwrap();
        assert!(probs.iter().all(|p| p.is_finite()));
        assert_eq!(probs.iter().sum::<f32>(), 1.0);
        let g = read_f32(
            &s.grad(&out.probs.slice([0..1, 0..1]).sum().backward())
                .unwrap(),
        )
        .unwrap();
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
        // Top-k sparsemax with huge scores: the relative scores stay finite.
        let out = topk_sparsemax(tensor(vec![3e38, 3e38], [1, 2]), 2).unwrap();
        assert_eq!(read_f32(&out.probs).unwrap(), vec![1.0, 0.0]);
    }

    #[test]
    fn sparsemax_loss_gradient_is_p_minus_one_hot() {
        let z = vec![1.0, 0.5, -1.0, 0.2, 0.1, 0.0];
        let t = tensor(z.clone(), [2, 3]);
        let loss = sparsemax_loss(t.clone(), &[1, 2]).unwrap();
        // Row 0 by hand: 0.5625 (see the kernel test). Row 1: full support, τ = -0.7 / 3,
        // p = [13, 10, 7] / 30, ||p||² = 318 / 900, <p, z> = 0.12,
        // L = ½ (582 / 900) + 0.12 - 0 = 0.443333...
        let values = read_f32(&loss.clone().reshape([1, 2])).unwrap();
        assert!((values[0] - 0.5625).abs() < 1e-6 && (values[1] - 0.443_333_34).abs() < 1e-6);
        let grads = loss.sum().backward();
        let grad = read_f32(&t.grad(&grads).unwrap()).unwrap();
        let expected = [
            0.75,
            0.25 - 1.0,
            0.0,
            13.0 / 30.0,
            10.0 / 30.0,
            7.0 / 30.0 - 1.0,
        ];
        for (a, b) in grad.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert!(matches!(
            sparsemax_loss(tensor(z, [2, 3]), &[3, 0]),
            Err(MappingError::BadTarget { .. })
        ));
        let masked = tensor(vec![f32::NEG_INFINITY, 1.0], [1, 2]);
        assert!(matches!(
            sparsemax_loss(masked, &[0]),
            Err(MappingError::BadTarget { target: 0, .. })
        ));
    }

    #[test]
    fn entropy_gradient_is_zero_at_exact_zeros_and_finite_differences_elsewhere() {
        let p = tensor(vec![0.5, 0.3, 0.2, 0.0], [1, 4]);
        let h = entropy(p.clone());
        let value = read_f32(&h.clone().reshape([1, 1])).unwrap()[0];
        let expected: f64 = [0.5f64, 0.3, 0.2].iter().map(|p| -p * p.ln()).sum();
        assert!((f64::from(value) - expected).abs() < 1e-6);
        let grad = read_f32(&p.grad(&h.sum().backward()).unwrap()).unwrap();
        // dH/dp_j = -(ln p_j + 1) on positive entries, exactly 0 on the zero.
        for (j, pj) in [0.5f32, 0.3, 0.2].iter().enumerate() {
            assert!((grad[j] + pj.ln() + 1.0).abs() < 1e-5);
        }
        assert_eq!(grad[3], 0.0);
        assert!(grad.iter().all(|g| g.is_finite()));
    }

    #[test]
    fn topk_sparsemax_is_sparsemax_over_brute_force_top_k_scores() {
        let mut rng = ChaCha8Rng::seed_from_u64(43);
        let (rows, d, k) = (8, 7, 10);
        let s: Vec<f32> = (0..rows * d)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let out = topk_sparsemax(tensor(s.clone(), [rows, d]), k).unwrap();
        let probs = read_f32(&out.probs).unwrap();
        for r in 0..rows {
            // Brute force: all 2^D scores, sorted, top k, then the f64 bisection-free kernel.
            let row = &s[r * d..][..d];
            let mut all: Vec<f32> = (0..1u32 << d)
                .map(|z| (0..d).filter(|i| z >> i & 1 == 1).map(|i| row[i]).sum())
                .collect();
            all.sort_by(|a, b| b.total_cmp(a));
            let expected = smax::sparsemax(&all[..k], k).unwrap();
            for (a, b) in probs[r * k..][..k].iter().zip(&expected) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
            assert_eq!(
                out.support[r],
                expected.iter().filter(|p| **p > 0.0).count()
            );
        }
    }

    #[test]
    fn topk_sparsemax_gradient_matches_finite_differences() {
        let (d, k) = (5, 6);
        // Scores without ties among subset sums, so that ±h keeps the ranking.
        let s = vec![0.31f32, -0.17, 0.13, 0.07, -0.43];
        let g = vec![1.0f32, -0.5, 0.25, 2.0, 0.0, -1.0];
        let grad = autodiff_vjp_topk(&s, &g, k);
        let at = |i: usize, h: f32| {
            let mut t = s.clone();
            t[i] += h;
            let p = read_f32(&topk_sparsemax(tensor(t, [1, d]), k).unwrap().probs).unwrap();
            p.iter().zip(&g).map(|(p, g)| f64::from(p * g)).sum::<f64>()
        };
        for (i, &analytic) in grad.iter().enumerate() {
            let fd = (at(i, 1e-3) - at(i, -1e-3)) / 2e-3;
            assert!(
                (fd - f64::from(analytic)).abs() < 2e-3,
                "i={i}: {fd} vs {analytic}"
            );
        }
    }

    fn autodiff_vjp_topk(s: &[f32], g: &[f32], k: usize) -> Vec<f32> {
        let z = tensor(s.to_vec(), [1, s.len()]);
        let upstream = Tensor::<2>::from_data(TensorData::new(g.to_vec(), [1, k]), &device());
        let grads = topk_sparsemax(z.clone(), k)
            .unwrap()
            .probs
            .mul(upstream)
            .sum()
            .backward();
        read_f32(&z.grad(&grads).unwrap()).unwrap()
    }

    #[test]
    fn sparsemap_tensor_weights_and_gradient_match_the_kernel() {
        let mut rng = ChaCha8Rng::seed_from_u64(47);
        let (rows, d) = (6, 10);
        let s: Vec<f32> = (0..rows * d)
            .map(|_| rng.random_range(-1.5f32..1.5))
            .collect();
        let options = SparseMapOptions {
            budget: Some(4),
            max_iter: 500,
            init: Init::Random { seed: 2 },
        };
        let z = tensor(s.clone(), [rows, d]);
        let out = sparsemap(z.clone(), &options).unwrap();
        let probs = read_f32(&out.probs).unwrap();
        let width = out.probs.dims()[1];
        let configs = read_f32(&out.configs).unwrap();
        // Σ_j p_j z_j reproduces the solver's marginals; padding has weight 0.
        for (r, sol) in out.solutions.iter().enumerate() {
            let mu = sol.marginals();
            for (i, m) in mu.iter().enumerate() {
                let got: f32 = (0..width)
                    .map(|j| probs[r * width + j] * configs[(r * width + j) * d + i])
                    .sum();
                assert!((f64::from(got) - m).abs() < 1e-5);
            }
        }
        // Gradient of Σ_j g_j p_j through autodiff equals the solver's VJP.
        let g: Vec<f32> = (0..rows * width)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let upstream = Tensor::<2>::from_data(TensorData::new(g.clone(), [rows, width]), &device());
        let grads = out.probs.mul(upstream).sum().backward();
        let grad = read_f32(&z.grad(&grads).unwrap()).unwrap();
        for (r, (sol, support)) in out
            .solutions
            .iter()
            .zip(out.solutions.iter().map(|s| s.support()))
            .enumerate()
        {
            let mut full = vec![0.0; sol.weights.len()];
            for (slot, &j) in support.iter().enumerate() {
                full[j] = f64::from(g[r * width + slot]);
            }
            for (a, b) in grad[r * d..][..d].iter().zip(sol.vjp(&full)) {
                assert!((f64::from(*a) - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
    }
}
