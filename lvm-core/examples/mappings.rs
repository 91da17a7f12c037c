//! A command-line window onto the sparse mappings, so that any other implementation can be
//! checked against ours: reads one JSON request on stdin, writes one JSON answer on stdout.
//!
//! ```text
//! echo '{"mapping":"sparsemax","scores":[[1,0.5,-1]]}' | cargo run --example mappings
//! {"probs":[[0.75,0.25,0.0]]}
//! ```
//!
//! Requests (`null` in a sparsemax score is a masked entry, `-inf`):
//! - `{"mapping":"sparsemax","scores":[[..]],"upstream":[[..]]}` → `{"probs","grad"}`
//! - `{"mapping":"topk","scores":[[..]],"k":10}` → `{"configs","config_scores"}`
//! - `{"mapping":"topk_sparsemax","scores":[[..]],"k":10}` → `{"configs","probs"}`
//! - `{"mapping":"sparsemap","scores":[[..]],"budget":0,"max_iter":300,"init":"map"}` →
//!   `{"configs","probs","marginals","converged"}` (`budget` 0: none; `init`: `map` or
//!   `random`, with an optional `"seed"`)
//!
//! A malformed request gets a one-line error on stderr and exit status 1.

use std::io::{Read, Write};
use std::process::ExitCode;

use burn::tensor::{Device, Tensor, TensorData};
use lvm_core::mappings::autodiff::read_f32;
use lvm_core::mappings::{self, Init, SparseMapOptions, kbest};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
#[serde(tag = "mapping", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Sparsemax {
        scores: Vec<Vec<Option<f64>>>,
        upstream: Option<Vec<Vec<f64>>>,
    },
    Topk {
        scores: Vec<Vec<f64>>,
        k: usize,
    },
    TopkSparsemax {
        scores: Vec<Vec<f64>>,
        k: usize,
    },
    Sparsemap {
        scores: Vec<Vec<f64>>,
        #[serde(default)]
        budget: usize,
        #[serde(default = "default_max_iter")]
        max_iter: usize,
        #[serde(default)]
        init: InitName,
        seed: Option<u64>,
    },
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "snake_case")]
enum InitName {
    #[default]
    Map,
    Random,
}

fn default_max_iter() -> usize {
    300
}

fn main() -> ExitCode {
    let written = run().and_then(|answer| {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{answer}")
            .and_then(|()| stdout.flush())
            .map_err(|e| format!("writing the answer: {e}"))
    });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<Value, String> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| format!("reading stdin: {e}"))?;
    let request: Request =
        serde_json::from_str(&input).map_err(|e| format!("invalid request: {e}"))?;
    let err = |e: lvm_core::MappingError| e.to_string();
    match request {
        Request::Sparsemax { scores, upstream } => {
            let masked = scores
                .iter()
                .map(|r| r.iter().map(|v| v.unwrap_or(f64::NEG_INFINITY)));
            let (flat, shape) = matrix(masked.map(Iterator::collect).collect(), "scores")?;
            let z = tensor(flat, shape).require_grad();
            let probs = mappings::sparsemax(z.clone()).map_err(err)?;
            let mut answer = json!({ "probs": rows(&read_f32(&probs).map_err(err)?, shape[1]) });
            if let Some(upstream) = upstream {
                let (g, g_shape) = matrix(upstream, "upstream")?;
                if let Some(at) = g.iter().position(|v| !v.is_finite()) {
                    let (row, col) = (at / shape[1], at % shape[1]);
                    return Err(format!("upstream: row {row}, column {col} is not finite"));
                }
                if g_shape != shape {
                    return Err(format!("upstream has shape {g_shape:?}, scores {shape:?}"));
                }
                let grads = probs.mul(tensor(g, shape)).sum().backward();
                let grad = z.grad(&grads).ok_or("no gradient reached the scores")?;
                answer["grad"] = rows(&read_f32(&grad).map_err(err)?, shape[1]);
            }
            Ok(answer)
        }
        Request::Topk { scores, k } => {
            let (flat, [_, bits]) = matrix(scores, "scores")?;
            let best = kbest::kbest(&flat, bits, k).map_err(err)?;
            let configs: Vec<Vec<Vec<u8>>> = best
                .iter()
                .map(|b| (0..k).map(|j| b.configs.to_u8(j)).collect())
                .collect();
            let scores: Vec<&[f64]> = best.iter().map(|b| b.scores.as_slice()).collect();
            Ok(json!({ "configs": configs, "config_scores": scores }))
        }
        Request::TopkSparsemax { scores, k } => {
            let (flat, shape) = matrix(scores, "scores")?;
            let out = mappings::topk_sparsemax(tensor(flat, shape), k).map_err(err)?;
            let configs = read_f32(&out.configs).map_err(err)?;
            let configs: Vec<Vec<Vec<u8>>> = configs
                .chunks(k * shape[1])
                .map(|c| {
                    c.chunks(shape[1])
                        .map(|z| z.iter().map(|&b| b as u8).collect())
                        .collect()
                })
                .collect();
            Ok(json!({ "configs": configs, "probs": rows(&read_f32(&out.probs).map_err(err)?, k) }))
        }
        Request::Sparsemap {
            scores,
            budget,
            max_iter,
            init,
            seed,
        } => {
            let (flat, [_, bits]) = matrix(scores, "scores")?;
            let init = match (init, seed) {
                (InitName::Map, None) => Init::Map,
                (InitName::Map, Some(_)) => return Err("seed applies only to init random".into()),
                (InitName::Random, seed) => Init::Random {
                    seed: seed.unwrap_or(0),
                },
            };
            let budget = (budget > 0).then_some(budget);
            let options = SparseMapOptions {
                budget,
                max_iter,
                init,
            };
            let solutions = mappings::sparsemap::sparsemap(&flat, bits, &options).map_err(err)?;
            let configs: Vec<Vec<Vec<u8>>> = solutions
                .iter()
                .map(|s| {
                    s.support()
                        .into_iter()
                        .map(|j| s.configs.to_u8(j))
                        .collect()
                })
                .collect();
            let probs: Vec<Vec<f64>> = solutions
                .iter()
                .map(|s| s.support().into_iter().map(|j| s.weights[j]).collect())
                .collect();
            let marginals: Vec<Vec<f64>> = solutions.iter().map(|s| s.marginals()).collect();
            let converged: Vec<bool> = solutions.iter().map(|s| s.converged).collect();
            Ok(json!({
                "configs": configs, "probs": probs, "marginals": marginals, "converged": converged
            }))
        }
    }
}

/// Flattens a list of equal-length rows into `f32`, naming `what` in the error when rows differ
/// in length or a finite value is outside the `f32` range (`-inf` passes: a masked entry).
fn matrix(values: Vec<Vec<f64>>, what: &str) -> Result<(Vec<f32>, [usize; 2]), String> {
    let width = values.first().map_or(0, Vec::len);
    if values.is_empty() || width == 0 {
        return Err(format!("{what} must be a non-empty list of non-empty rows"));
    }
    if let Some(row) = values.iter().position(|r| r.len() != width) {
        let got = values[row].len();
        return Err(format!(
            "{what}: row {row} has {got} entries, expected {width}"
        ));
    }
    let height = values.len();
    let mut flat = Vec::with_capacity(height * width);
    for (row, col, v) in values
        .iter()
        .enumerate()
        .flat_map(|(r, vs)| vs.iter().enumerate().map(move |(c, v)| (r, c, *v)))
    {
        let single = v as f32;
        if v.is_finite() && !single.is_finite() {
            return Err(format!(
                "{what}: row {row}, column {col}: {v:e} is outside the f32 range"
            ));
        }
        flat.push(single);
    }
    Ok((flat, [height, width]))
}

fn tensor(values: Vec<f32>, shape: [usize; 2]) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values, shape), &Device::flex().autodiff())
}

fn rows(values: &[f32], width: usize) -> Value {
    json!(values.chunks(width).collect::<Vec<_>>())
}
