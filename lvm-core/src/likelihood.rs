//! The bit-vector VAE's pixel likelihood (reference §9.1): each of `P` pixels has a
//! `V`-way categorical whose logits come from a rank-`R` projection shared by all pixels,
//!
//! ```text
//! l(e, p, v) = Σ_r h(e, p, r) W(r, v) + c(v)
//! -log p(x_e | h_e) = Σ_p [ logsumexp_v l(e, p, v) - l(e, p, x_ep) ]
//! ```
//!
//! Two implementations with the same value and gradient: [`pixel_nll_materialized`] builds the
//! `[E·P, V]` logit matrix with tensor ops (right for GPUs), and [`pixel_nll_fused`] computes
//! the normalizer pixel by pixel on the CPU without ever holding that matrix, returning the
//! value with its exact gradient attached through linear terms (`value + G·(θ - detach θ)`).

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use rayon::prelude::*;

use crate::error::MappingError;
use crate::mappings::autodiff::read_f32;

/// `-log p(x | h)` per example by materializing every logit.
///
/// # Shapes
/// `h`: `[E, P, R]`, `w`: `[R, V]`, `c`: `[V]`, `targets`: `E·P` values below `V` → `[E]`.
///
/// # Panics
/// If `targets.len() != E·P` or a target is not below `V`.
pub fn pixel_nll_materialized(
    h: Tensor<3>,
    w: Tensor<2>,
    c: Tensor<1>,
    targets: &[u8],
) -> Tensor<1> {
    let [examples, pixels, rank] = h.dims();
    let values = w.dims()[1];
    assert_eq!(targets.len(), examples * pixels, "one target per pixel");
    assert!(
        targets.iter().all(|&t| usize::from(t) < values),
        "pixel targets below {values}"
    );
    let logits = h
        .reshape([examples * pixels, rank])
        .matmul(w)
        .add(c.reshape([1, values]));
    let index: Vec<i64> = targets.iter().map(|&t| i64::from(t)).collect();
    let index = Tensor::<2, Int>::from_data(
        TensorData::new(index, [examples * pixels, 1]),
        &logits.device(),
    );
    let picked = log_softmax(logits, 1).gather(1, index);
    picked
        .reshape([examples, pixels])
        .sum_dim(1)
        .reshape([examples])
        .neg()
}

/// `-log p(x | h)` per example without materializing the logits: one pass per pixel on the
/// CPU (examples in parallel), returning the exact value and gradient.
///
/// # Shapes
/// As [`pixel_nll_materialized`].
///
/// # Panics
/// If `targets.len() != E·P` or a target is not below `V`.
pub fn pixel_nll_fused(
    h: Tensor<3>,
    w: Tensor<2>,
    c: Tensor<1>,
    targets: &[u8],
) -> Result<Tensor<1>, MappingError> {
    let [examples, pixels, rank] = h.dims();
    let values = w.dims()[1];
    assert_eq!(targets.len(), examples * pixels, "one target per pixel");
    let (hv, wv, cv) = (read_f32(&h)?, read_f32(&w)?, read_f32(&c)?);
    for (what, values) in [("h", &hv), ("W", &wv), ("c", &cv)] {
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(MappingError::NonFiniteInput {
                what,
                index,
                value: values[index],
            });
        }
    }

    // Per example: the value, ∂/∂h (P×R), ∂/∂W (R×V) and ∂/∂c (V).
    let arch = pulp::Arch::new();
    let per_example: Vec<ExampleGrad> = (0..examples)
        .into_par_iter()
        .map(|e| {
            Example {
                h: &hv[e * pixels * rank..][..pixels * rank],
                w: &wv,
                c: &cv,
                targets: &targets[e * pixels..][..pixels],
                rank,
                values,
            }
            .nll(arch)
        })
        .collect();

    let device = h.device();
    let value: Vec<f32> = per_example.iter().map(|g| g.value as f32).collect();
    let flat = |f: &dyn Fn(&ExampleGrad) -> &Vec<f32>| -> Vec<f32> {
        per_example
            .iter()
            .flat_map(|g| f(g).iter().copied())
            .collect()
    };
    let g_h = Tensor::<3>::from_data(
        TensorData::new(flat(&|g| &g.h), [examples, pixels, rank]),
        &device,
    );
    let g_w = Tensor::<2>::from_data(
        TensorData::new(flat(&|g| &g.w), [examples, rank * values]),
        &device,
    );
    let g_c = Tensor::<2>::from_data(
        TensorData::new(flat(&|g| &g.c), [examples, values]),
        &device,
    );

    // value_e + Σ G_h (h - h̄) + G_W·vec(W - W̄) + G_c·(c - c̄): exact value, exact gradient.
    let dh = h
        .clone()
        .sub(h.detach())
        .mul(g_h)
        .sum_dim(2)
        .sum_dim(1)
        .reshape([examples]);
    let dw = g_w
        .matmul(w.clone().sub(w.detach()).reshape([rank * values, 1]))
        .reshape([examples]);
    let dc = g_c
        .matmul(c.clone().sub(c.detach()).reshape([values, 1]))
        .reshape([examples]);
    let value = Tensor::<1>::from_data(TensorData::new(value, [examples]), &device);
    Ok(value.add(dh.add(dw).add(dc)))
}

/// The value and gradients of one example's negative log-likelihood.
struct ExampleGrad {
    value: f64,
    h: Vec<f32>,
    w: Vec<f32>,
    c: Vec<f32>,
}

/// One example's inputs: its `P×R` projections `h`, the shared `W` and `c`, its pixels and
/// the sizes.
#[derive(Clone, Copy)]
struct Example<'a> {
    h: &'a [f32],
    w: &'a [f32],
    c: &'a [f32],
    targets: &'a [u8],
    rank: usize,
    values: usize,
}

impl Example<'_> {
    /// The value and gradients: [`example_nll_body`] compiled for the widest vectors the CPU
    /// has (AVX2 and FMA on most x86-64 servers), as detected once in `arch`. Every variant
    /// runs the same operations in the same order (Rust never fuses a multiply and an add on
    /// its own), so the results are bit-identical on every CPU.
    fn nll(self, arch: pulp::Arch) -> ExampleGrad {
        arch.dispatch(self)
    }
}

/// `with_simd` is inlined into each of pulp's per-instruction-set functions (a closure would
/// not be), and so is the body it calls.
impl pulp::WithSimd for Example<'_> {
    type Output = ExampleGrad;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> ExampleGrad {
        example_nll_body(self)
    }
}

/// One example, pixel by pixel, with softmax `π` over the `V` values of each pixel:
///
/// ```text
/// ∂/∂h(p, r) = Σ_v π(p, v) W(r, v) - W(r, x_p)
/// ∂/∂W(r, v) = Σ_p h(p, r) (π(p, v) - 1[v = x_p])
/// ∂/∂c(v) = Σ_p π(p, v) - 1[v = x_p]
/// ```
#[inline(always)]
fn example_nll_body(example: Example<'_>) -> ExampleGrad {
    let Example {
        h,
        w,
        c,
        targets,
        rank,
        values,
    } = example;
    let mut grad = ExampleGrad {
        value: 0.0,
        h: vec![0.0; h.len()],
        w: vec![0.0; w.len()],
        c: vec![0.0; values],
    };
    let mut logits = vec![0.0f32; values];
    for (p, &x) in targets.iter().enumerate() {
        let hp = &h[p * rank..][..rank];
        let x = usize::from(x);
        assert!(x < values, "pixel target {x} is not below {values}");

        // l(v) = c(v) + Σ_r h(r) W(r, v), then logsumexp.
        logits.copy_from_slice(c);
        for (r, &hr) in hp.iter().enumerate() {
            for (l, &wv) in logits.iter_mut().zip(&w[r * values..][..values]) {
                *l += hr * wv;
            }
        }
        let max = max_of(&logits);
        for l in logits.iter_mut() {
            *l = fast_exp(*l - max);
        }
        let total = sum(&logits);
        let lse = f64::from(max) + f64::from(total).ln();
        let target_logit = f64::from(c[x])
            + hp.iter()
                .enumerate()
                .map(|(r, &hr)| f64::from(hr * w[r * values + x]))
                .sum::<f64>();
        grad.value += lse - target_logit;

        // π - e_x, then the three gradients.
        let inv = 1.0 / total;
        logits.iter_mut().for_each(|l| *l *= inv);
        logits[x] -= 1.0;
        for (gc, &d) in grad.c.iter_mut().zip(&logits) {
            *gc += d;
        }
        for (r, &hr) in hp.iter().enumerate() {
            let w_row = &w[r * values..][..values];
            grad.h[p * rank + r] = dot(w_row, &logits);
            for (gw, &d) in grad.w[r * values..][..values].iter_mut().zip(&logits) {
                *gw += hr * d;
            }
        }
    }
    grad
}

/// `e^x` for `x <= 0` to about 2e-7 relative error, branch-free so that loops over it
/// vectorize: `x = n ln 2 + r` with `|r| <= ln 2 / 2`, a degree-6 polynomial for `e^r`, and
/// `2^n` built in the exponent bits. Inputs below -87 return 0 (e^-87 ≈ 1.6e-38 is the edge
/// of f32's normal range, and such a term cannot change a sum that includes e^0 = 1). Inputs
/// must be finite (callers check).
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    // Round to nearest with the 1.5·2^23 trick (no SSE4.1 rounding instruction needed).
    const SHIFTER: f32 = 12_582_912.0;
    let keep = f32::from(u8::from(x >= -87.0));
    let x = if x > -87.0 { x } else { -87.0 };
    let shifted = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = shifted - SHIFTER;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    // Taylor coefficients 1/k! of e^r.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    // `n` as an integer, read from the bits of `shifted` (ulp 1 there), since a float-to-int
    // `as` cast saturates lane by lane and keeps the loop from vectorizing.
    let n_int = shifted.to_bits().wrapping_sub(SHIFTER.to_bits()) as i32;
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    p * scale * keep
}

/// Maximum of finite values with eight independent lanes, so that it vectorizes.
#[inline(always)]
fn max_of(values: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            // A plain comparison (the values are finite) compiles to one vector max;
            // `f32::max`'s NaN rule costs a compare and a blend more.
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// `Σ a_i b_i` with eight independent accumulators, so that it vectorizes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for lane in 0..8 {
            acc[lane] += x[lane] * y[lane];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Sum with eight independent accumulators, so that it vectorizes.
#[inline(always)]
fn sum(values: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn leaf<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
        Tensor::from_data(TensorData::new(values, shape), &Device::flex().autodiff()).require_grad()
    }

    #[test]
    fn fused_equals_materialized_in_value_and_gradient() {
        let mut rng = ChaCha8Rng::seed_from_u64(31);
        let (examples, pixels, rank, values) = (3, 7, 5, 16);
        let mut draw =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
        let (hv, wv, cv) = (
            draw(examples * pixels * rank),
            draw(rank * values),
            draw(values),
        );
        let targets: Vec<u8> = (0..examples * pixels)
            .map(|i| (i * 7 % values) as u8)
            .collect();
        let upstream = [1.0f32, -0.5, 2.0];

        let run = |fused: bool| {
            let (h, w, c) = (
                leaf(hv.clone(), [examples, pixels, rank]),
                leaf(wv.clone(), [rank, values]),
                leaf(cv.clone(), [values]),
            );
            let nll = if fused {
                pixel_nll_fused(h.clone(), w.clone(), c.clone(), &targets).unwrap()
            } else {
                pixel_nll_materialized(h.clone(), w.clone(), c.clone(), &targets)
            };
            let value = read_f32(&nll).unwrap();
            let weights = Tensor::<1>::from_floats(upstream, &nll.device());
            let grads = nll.mul(weights).sum().backward();
            let g = |t: Vec<f32>| t;
            (
                value,
                g(read_f32(&h.grad(&grads).unwrap()).unwrap()),
                read_f32(&w.grad(&grads).unwrap()).unwrap(),
                read_f32(&c.grad(&grads).unwrap()).unwrap(),
            )
        };
        let (fused, plain) = (run(true), run(false));
        for (name, a, b) in [
            ("value", &fused.0, &plain.0),
            ("h", &fused.1, &plain.1),
            ("W", &fused.2, &plain.2),
            ("c", &fused.3, &plain.3),
        ] {
            for (x, y) in a.iter().zip(b.iter()) {
                assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{name}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn the_vectorized_kernel_equals_the_baseline_one_bit_for_bit() {
        // `Example::nll` runs the body compiled for this CPU's widest vectors; called directly,
        // the body is compiled for the baseline instruction set. Bit-identical results are
        // what keep a seeded trial's metrics the same on every CPU.
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let (pixels, rank, values) = (37, 5, 256);
        let mut draw =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect() };
        let (h, w, c) = (draw(pixels * rank), draw(rank * values), draw(values));
        let targets: Vec<u8> = (0..pixels).map(|p| (p * 71 % values) as u8).collect();
        let example = Example {
            h: &h,
            w: &w,
            c: &c,
            targets: &targets,
            rank,
            values,
        };
        let (wide, base) = (example.nll(pulp::Arch::new()), example_nll_body(example));
        assert_eq!(wide.value.to_bits(), base.value.to_bits());
        for (name, a, b) in [
            ("h", &wide.h, &base.h),
            ("W", &wide.w, &base.w),
            ("c", &wide.c, &base.c),
        ] {
            let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(a), bits(b), "{name}");
        }
    }

    #[test]
    fn fast_exp_matches_exp_to_single_precision() {
        let mut x = -90.0f32;
        while x <= 0.0 {
            let (got, want) = (f64::from(fast_exp(x)), f64::from(x.exp()));
            // Below -87 the result is 0: e^-87 = 1.6e-38 is the edge of f32's normal range.
            assert!(
                (got - want).abs() <= 4e-7 * want + 2e-38,
                "e^{x}: {got} vs {want}"
            );
            x += 0.0137;
        }
        assert_eq!(fast_exp(0.0), 1.0);
    }

    #[test]
    fn non_finite_inputs_are_refused_not_hidden() {
        let (h, w) = (leaf(vec![0.1; 4], [1, 1, 4]), leaf(vec![0.2; 16], [4, 4]));
        let c = leaf(vec![0.0, 0.0, f32::NAN, 0.0], [4]);
        let err = pixel_nll_fused(h, w, c, &[1]).unwrap_err();
        assert!(
            matches!(
                err,
                MappingError::NonFiniteInput {
                    what: "c",
                    index: 2,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_uniform_categorical_costs_log_v_per_pixel() {
        // All logits equal: -log p = P log V for any targets (by hand).
        let (h, w, c) = (
            leaf(vec![0.0; 2 * 3 * 2], [2, 3, 2]),
            leaf(vec![0.0; 2 * 4], [2, 4]),
            leaf(vec![0.5; 4], [4]),
        );
        let nll = read_f32(&pixel_nll_fused(h, w, c, &[0, 1, 2, 3, 0, 1]).unwrap()).unwrap();
        for v in nll {
            assert!((f64::from(v) - 3.0 * 4f64.ln()).abs() < 1e-5);
        }
    }
}
