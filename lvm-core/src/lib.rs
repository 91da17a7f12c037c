//! lvm-core: the science of lvm-sweep. Exact sparse mappings (sparsemax, top-k sparsemax,
//! SparseMAP over bit vectors), the verified datasets, the gradient estimators, the three
//! tasks of the paper and the training loop that runs one trial ([`train::run_trial`]). Its
//! only network use is fetching a missing dataset file from its public mirror, and it never
//! prints.
//!
//! A short tour. Sparsemax projects scores onto the simplex and gives exact zeros:
//!
//! ```
//! let probs = lvm_core::mappings::sparsemax::sparsemax(&[1.0, 0.5, -1.0], 3).unwrap();
//! assert_eq!(probs, vec![0.75, 0.25, 0.0]);
//! ```
//!
//! The k best bit vectors under `s·z`, best first:
//!
//! ```
//! let best = lvm_core::mappings::kbest::kbest(&[1.2, -0.5, 0.3], 3, 2).unwrap();
//! assert_eq!(best[0].configs.to_u8(0), vec![1, 0, 1]);
//! assert_eq!(best[0].configs.to_u8(1), vec![1, 0, 0]);
//! ```
//!
//! SparseMAP returns a sparse distribution over bit vectors whose marginals are
//! `clip((s + 1) / 2, 0, 1)`:
//!
//! ```
//! use lvm_core::mappings::{sparsemap::sparsemap, SparseMapOptions};
//! let solution = sparsemap(&[0.5, -3.0], 2, &SparseMapOptions::default()).unwrap().remove(0);
//! let mu = solution.marginals();
//! assert!((mu[0] - 0.75).abs() < 1e-12 && mu[1] == 0.0);
//! assert_eq!(solution.support().len(), 2);
//! ```
//!
//! The same mappings on Burn tensors, differentiable on any device
//! ([`mappings::autodiff`]):
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//! let device = Device::flex().autodiff();
//! let z = Tensor::<2>::from_floats([[1.0, 0.5, -1.0]], &device).require_grad();
//! let p = lvm_core::mappings::sparsemax(z.clone()).unwrap();
//! let grads = p.slice([0..1, 0..1]).sum().backward();
//! let g = z.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
//! assert_eq!(g, vec![0.5, -0.5, 0.0]);
//! ```

pub mod checkpoint;
pub mod data;
pub mod error;
pub mod estimators;
pub mod likelihood;
pub mod mappings;
pub mod spec;
pub mod tasks;
pub mod train;

pub use error::MappingError;
pub use spec::{Estimator, Hyperparameters, SpecError, Task, Temperature, TrialSpec};
