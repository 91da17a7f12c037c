//! The exact sparse mappings: sparsemax, the k-best bit-vector oracle, top-k sparsemax,
//! SparseMAP over bit vectors (with and without a budget) and entropies that handle exact
//! zeros. Each mapping is a plain CPU kernel over slices in its own file; [`autodiff`] plugs
//! them into Burn's autodiff without custom backward passes.

pub mod autodiff;
pub mod entropy;
pub mod kbest;
pub mod sparsemap;
pub mod sparsemax;

pub use autodiff::{
    SparseMapOutput, TopKSparsemax, entropy, sparsemap, sparsemax, sparsemax_loss, topk_sparsemax,
};
pub use kbest::{BitConfigs, KBest};
pub use sparsemap::{Init, SparseMapOptions, SparseMapSolution};
