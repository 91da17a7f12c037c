//! The k highest-scoring bit vectors `z ∈ {0,1}^D` under the linear score `s·z`, exactly, by
//! a list merge over bits (a zeroth-order Viterbi; reference §6). Plain CPU kernel: the
//! differentiable top-k sparsemax built on it lives in [`super::autodiff`].
//!
//! # Tie order
//! Configurations are ordered by score, highest first; among exactly equal scores the one
//! whose bit vector, read as a binary number with bit `i` worth `2^i`, is *smaller* comes
//! first. Equivalently: enumerate `z = 0, 1, ..., 2^D - 1` and sort stably by descending score.
//! (The original favoured "on" for bit 0 and "off" for the others; we use one rule for all.)
//! Scores are accumulated in `f64` in increasing bit order. The order is exact whenever those
//! sums are exact, which holds for any `D <= 512` when the nonzero `|s_i|` span less than
//! 2^20 in ratio (a `f32` has 24 significant bits, `f64` 53). Beyond that, scores that differ
//! by less than the rounding of their sum count as ties.
//!
//! The list grows to `min(k, 2^i)` entries at bit `i`, so time and memory are `O(D k)`; `k` is
//! therefore capped at [`MAX_K`].

use rayon::prelude::*;

use crate::error::MappingError;

/// A set of bit vectors of one length, stored as packed `u64` words.
#[derive(Debug, Clone, PartialEq)]
pub struct BitConfigs {
    bits: usize,
    words: usize,
    data: Vec<u64>,
}

impl BitConfigs {
    /// An empty set of `bits`-long vectors.
    pub fn new(bits: usize) -> Self {
        Self {
            bits,
            words: bits.div_ceil(64),
            data: Vec::new(),
        }
    }

    /// Number of bits per vector (D).
    pub fn bits(&self) -> usize {
        self.bits
    }

    /// Number of vectors held.
    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.words).unwrap_or(0)
    }

    /// Whether no vector is held.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Bit `i` of vector `j`.
    pub fn get(&self, j: usize, i: usize) -> bool {
        self.data[j * self.words + i / 64] >> (i % 64) & 1 == 1
    }

    /// The packed words of vector `j`.
    pub fn words_of(&self, j: usize) -> &[u64] {
        &self.data[j * self.words..(j + 1) * self.words]
    }

    /// Appends a vector given as packed words.
    pub fn push_words(&mut self, words: &[u64]) {
        debug_assert_eq!(words.len(), self.words);
        self.data.extend_from_slice(words);
    }

    /// Appends a vector given as one `bool` per bit.
    pub fn push_bools(&mut self, bools: &[bool]) {
        assert_eq!(bools.len(), self.bits, "bit vector length");
        let start = self.data.len();
        self.data.resize(start + self.words, 0);
        for (i, _) in bools.iter().enumerate().filter(|(_, b)| **b) {
            self.data[start + i / 64] |= 1 << (i % 64);
        }
    }

    /// Removes vector `j`, shifting the later ones down.
    pub fn remove(&mut self, j: usize) {
        self.data.drain(j * self.words..(j + 1) * self.words);
    }

    /// Vector `j` as 0/1 values.
    pub fn to_u8(&self, j: usize) -> Vec<u8> {
        (0..self.bits).map(|i| u8::from(self.get(j, i))).collect()
    }

    /// Number of bits on in vector `j`.
    pub fn count_ones(&self, j: usize) -> usize {
        self.words_of(j)
            .iter()
            .map(|w| w.count_ones() as usize)
            .sum()
    }

    /// Number of positions where vectors `a` and `b` agree: `D - Hamming(a, b)`.
    pub fn agreement(&self, a: usize, b: usize) -> usize {
        self.agreement_with(a, self.words_of(b))
    }

    /// Number of positions where vector `a` agrees with the packed vector `other`.
    pub fn agreement_with(&self, a: usize, other: &[u64]) -> usize {
        let differ: u32 = self
            .words_of(a)
            .iter()
            .zip(other)
            .map(|(x, y)| (x ^ y).count_ones())
            .sum();
        self.bits - differ as usize
    }

    /// Linear score `s·z` of vector `j`, summed in increasing bit order in `f64`.
    pub fn score(&self, j: usize, s: &[f32]) -> f64 {
        score_words(self.words_of(j), s)
    }
}

/// `s·z` for a packed vector, summed in increasing bit order in `f64`.
pub fn score_words<T: Copy + Into<f64>>(words: &[u64], s: &[T]) -> f64 {
    let mut total = 0.0f64;
    for (w, &word) in words.iter().enumerate() {
        let mut rest = word;
        while rest != 0 {
            let i = w * 64 + rest.trailing_zeros() as usize;
            total += s[i].into();
            rest &= rest - 1;
        }
    }
    total
}

/// The k best configurations of one example, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct KBest {
    /// The configurations, best first.
    pub configs: BitConfigs,
    /// Their scores `s·z`, descending.
    pub scores: Vec<f64>,
}

/// Largest k the oracle enumerates: `2^20` configurations per example (at D = 128 that is
/// already 16 MiB of bit vectors per example).
pub const MAX_K: usize = 1 << 20;

/// Checks `1 <= k <= 2^bits` and `k <= MAX_K`.
pub fn validate_k(k: usize, bits: usize) -> Result<(), MappingError> {
    let max = if bits >= usize::BITS as usize {
        usize::MAX
    } else {
        1usize << bits
    };
    if k == 0 || k > max || bits == 0 {
        return Err(MappingError::BadK { k, bits });
    }
    if k > MAX_K {
        return Err(MappingError::KTooLarge { k, max: MAX_K });
    }
    Ok(())
}

/// The `k` best bit vectors of one example under `s·z` (reference §6), in the tie order of
/// the module doc.
///
/// ```text
/// L_0 = sorted { (0, z_0 = 0), (s_0, z_0 = 1) }
/// L_i = top-k of merge(L_{i-1}, { (c + s_i, z ∪ {i}) : (c, z) ∈ L_{i-1} })
/// ```
///
/// On equal scores the merge takes the list item with bit `i` off, which realizes the tie
/// order (higher bits are compared first). `O(D k ⌈D/64⌉)` time.
///
/// # Panics
/// If `k` is outside `1..=2^D` or `s` is empty (callers validate first).
pub fn kbest_row(s: &[f32], k: usize) -> KBest {
    validate_k(k, s.len()).expect("k-best: invalid k");
    let words = s.len().div_ceil(64);
    let mut current = KBest {
        configs: BitConfigs::new(s.len()),
        scores: Vec::new(),
    };
    let mut next = current.clone();
    let zero = vec![0u64; words];
    current.configs.push_words(&zero);
    current.scores.push(0.0);
    let mut with_bit = vec![0u64; words];

    for (i, &si) in s.iter().enumerate() {
        let si = f64::from(si);
        next.configs.data.clear();
        next.scores.clear();
        let (mut a, mut b) = (0usize, 0usize);
        let n = current.scores.len();
        while next.scores.len() < k && (a < n || b < n) {
            // Take the "bit on" item only if strictly better: ties keep bit i off.
            let take_on = b < n && (a >= n || current.scores[b] + si > current.scores[a]);
            if take_on {
                with_bit.copy_from_slice(current.configs.words_of(b));
                with_bit[i / 64] |= 1 << (i % 64);
                next.configs.push_words(&with_bit);
                next.scores.push(current.scores[b] + si);
                b += 1;
            } else {
                next.configs.push_words(current.configs.words_of(a));
                next.scores.push(current.scores[a]);
                a += 1;
            }
        }
        std::mem::swap(&mut current, &mut next);
    }
    current
}

/// The `k` best bit vectors of each row of a `[rows, D]` score matrix, rows in parallel.
pub fn kbest(scores: &[f32], bits: usize, k: usize) -> Result<Vec<KBest>, MappingError> {
    validate_k(k, bits)?;
    validate_bit_scores(scores, bits)?;
    Ok(scores.par_chunks(bits).map(|s| kbest_row(s, k)).collect())
}

/// Checks that bit scores form a `[rows, D]` matrix of finite values.
pub fn validate_bit_scores(scores: &[f32], bits: usize) -> Result<(), MappingError> {
    if bits == 0 {
        return Err(MappingError::Empty);
    }
    if !scores.len().is_multiple_of(bits) {
        let row = scores.len() / bits;
        return Err(MappingError::Ragged {
            row,
            got: scores.len() % bits,
            expected: bits,
        });
    }
    match scores.iter().position(|v| !v.is_finite()) {
        Some(at) => Err(MappingError::NonFiniteBitScore {
            row: at / bits,
            col: at % bits,
            value: scores[at],
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// Brute force: every `z` in increasing binary order, stably sorted by descending score.
    fn brute_force(s: &[f32]) -> Vec<(u64, f64)> {
        let mut all: Vec<(u64, f64)> = (0..1u64 << s.len())
            .map(|z| (z, score_words(&[z], s)))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1));
        all
    }

    fn check_against_brute_force(s: &[f32]) {
        let expected = brute_force(s);
        for k in 1..=expected.len() {
            let got = kbest_row(s, k);
            assert_eq!(got.scores.len(), k);
            for (j, (z, score)) in expected[..k].iter().enumerate() {
                assert_eq!(got.configs.words_of(j), &[*z], "s={s:?} k={k} rank {j}");
                assert_eq!(got.scores[j], *score);
            }
        }
    }

    #[test]
    fn golden_example_from_the_reference() {
        // Reference §6: s = [1.2, 0.7, -0.1, 0.4, -2.0], k = 4.
        let got = kbest_row(&[1.2, 0.7, -0.1, 0.4, -2.0], 4);
        let configs: Vec<Vec<u8>> = (0..4).map(|j| got.configs.to_u8(j)).collect();
        assert_eq!(
            configs,
            vec![
                vec![1, 1, 0, 1, 0],
                vec![1, 1, 1, 1, 0],
                vec![1, 1, 0, 0, 0],
                vec![1, 1, 1, 0, 0]
            ]
        );
        let expected = [2.3, 2.2, 1.9, 1.8];
        for (a, b) in got.scores.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn equals_brute_force_for_every_d_up_to_12_and_every_k() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for d in 1..=12 {
            let s: Vec<f32> = (0..d).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            check_against_brute_force(&s);
            // Ties everywhere: small integers and zeros.
            let s: Vec<f32> = (0..d).map(|_| rng.random_range(-2i32..=2) as f32).collect();
            check_against_brute_force(&s);
        }
    }

    #[test]
    fn refuses_k_above_two_to_the_d_and_zero() {
        assert_eq!(
            kbest(&[0.0; 3], 3, 9),
            Err(MappingError::BadK { k: 9, bits: 3 })
        );
        assert_eq!(
            kbest(&[0.0; 3], 3, 0),
            Err(MappingError::BadK { k: 0, bits: 3 })
        );
        assert_eq!(kbest(&[0.0; 3], 3, 8).unwrap()[0].scores.len(), 8);
        assert!(matches!(
            kbest(&[f32::NAN], 1, 1),
            Err(MappingError::NonFiniteBitScore { .. })
        ));
        let err = kbest(&[0.0; 40], 40, MAX_K + 1).unwrap_err();
        assert_eq!(
            err,
            MappingError::KTooLarge {
                k: MAX_K + 1,
                max: MAX_K
            }
        );
    }

    #[test]
    fn works_beyond_one_machine_word() {
        // D = 130 with one clearly positive bit per word: the best is those bits on,
        // the second best additionally turns on the least negative remaining bit.
        let mut s = vec![-1.0f32; 130];
        s[3] = 2.0;
        s[70] = 1.5;
        s[129] = 0.5;
        s[100] = -0.25;
        let got = kbest(&s, 130, 2).unwrap().remove(0);
        let on: Vec<usize> = (0..130).filter(|&i| got.configs.get(0, i)).collect();
        assert_eq!(on, vec![3, 70, 129]);
        assert!(got.configs.get(1, 100));
        assert!((got.scores[1] - 3.75).abs() < 1e-12);
    }

    proptest! {
        #[test]
        fn matches_brute_force_on_adversarial_scores(
            s in prop::collection::vec(
                prop_oneof![-3.0f32..3.0, Just(0.0f32), Just(1.0f32), Just(-1.0f32),
                            Just(0.5f32), Just(-0.25f32)],
                1..9,
            ),
            // Huge and tiny magnitudes: a power-of-two scale keeps the sums exact, so ties
            // stay ties and the documented order applies.
            scale in prop_oneof![Just(1.0f32), Just(2f32.powi(100)), Just(2f32.powi(-100))],
        ) {
            let s: Vec<f32> = s.iter().map(|v| v * scale).collect();
            check_against_brute_force(&s);
        }
    }
}
