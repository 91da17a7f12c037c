//! Reader for the IDX format of MNIST and Fashion-MNIST (`*-idx3-ubyte`, `*-idx1-ubyte`),
//! raw bytes in, a shape and `u8` data out. Only unsigned-byte IDX files exist in these
//! datasets, so other element types are refused.
//!
//! Layout: two zero bytes, a type byte (`0x08` = u8), a rank byte, `rank` big-endian `u32`
//! dimensions, then the row-major data.

use std::path::Path;

use super::error::DataError;

/// An IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimensions, outermost first (e.g. `[60000, 28, 28]`).
    pub dims: Vec<usize>,
    /// Row-major elements.
    pub data: Vec<u8>,
}

/// Parses an IDX file's bytes; `file` only names it in errors.
pub fn parse_idx(bytes: &[u8], file: &Path) -> Result<IdxArray, DataError> {
    let format = |detail: String| DataError::Format {
        file: file.into(),
        format: "IDX",
        detail,
    };
    if bytes.len() < 4 {
        return Err(format(format!(
            "{} bytes is shorter than the 4-byte magic number",
            bytes.len()
        )));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        return Err(format(format!(
            "magic number {magic:#010x} does not start with two zero bytes"
        )));
    }
    if bytes[2] != 0x08 {
        return Err(format(format!(
            "element type {:#04x}, expected 0x08 (unsigned byte)",
            bytes[2]
        )));
    }
    let rank = usize::from(bytes[3]);
    if rank == 0 {
        return Err(format("rank 0".into()));
    }
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(DataError::Truncated {
            file: file.into(),
            expected: header,
            got: bytes.len(),
        });
    }

    // Dimensions, then the element count with overflow checked (a corrupt header can claim
    // anything).
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format(format!("dimensions {dims:?} overflow")))?;
    let data = &bytes[header..];
    if data.len() < count {
        return Err(DataError::Truncated {
            file: file.into(),
            expected: count,
            got: data.len(),
        });
    }
    if data.len() > count {
        let detail = format!("{} bytes after the {count} announced", data.len() - count);
        return Err(format(detail));
    }
    Ok(IdxArray {
        dims,
        data: data.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0, 0, 8, dims.len() as u8];
        dims.iter().for_each(|d| bytes.extend(d.to_be_bytes()));
        bytes.extend(data);
        bytes
    }

    #[test]
    fn reads_a_small_image_file() {
        let bytes = idx(&[2, 2, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let array = parse_idx(&bytes, Path::new("x")).unwrap();
        assert_eq!(array.dims, vec![2, 2, 3]);
        assert_eq!(array.data[11], 12);
    }

    #[test]
    fn refuses_bad_magic_truncation_and_trailing_bytes() {
        let file = Path::new("images.idx");
        let err = parse_idx(&[1, 0, 8, 1, 0, 0, 0, 1, 5], file)
            .unwrap_err()
            .to_string();
        assert!(err.contains("images.idx") && err.contains("magic"), "{err}");
        let err = parse_idx(&[0, 0, 0x0d, 1, 0, 0, 0, 1, 5], file)
            .unwrap_err()
            .to_string();
        assert!(err.contains("element type 0x0d"), "{err}");
        let err = parse_idx(&idx(&[3], &[1, 2]), file).unwrap_err();
        assert!(matches!(
            err,
            DataError::Truncated {
                expected: 3,
                got: 2,
                ..
            }
        ));
        let err = parse_idx(&idx(&[1], &[1, 2]), file)
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 bytes after"), "{err}");
        let err = parse_idx(&idx(&[u32::MAX, u32::MAX, u32::MAX], &[]), file).unwrap_err();
        assert!(err.to_string().contains("overflow"));
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_idx(&bytes, Path::new("fuzz"));
        }

        #[test]
        fn never_panics_on_corrupted_valid_files(
            flip in 0usize..40, value in any::<u8>(), cut in 0usize..40
        ) {
            let mut bytes = idx(&[2, 3, 4], &[7; 24]);
            let at = flip % bytes.len();
            bytes[at] = value;
            bytes.truncate(bytes.len() - cut % bytes.len());
            let _ = parse_idx(&bytes, Path::new("fuzz"));
        }
    }
}
