//! Reader for NumPy `.npy` files (format versions 1.0–3.0): the semi-supervised split files
//! (`<i8` vectors) and user-provided feature matrices (`<f4`) and label vectors. C order only;
//! little- and big-endian integers and floats of the common widths.

use std::path::Path;

use super::error::DataError;

/// The elements of an NPY array, in their stored type.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    /// `u1`.
    U8(Vec<u8>),
    /// `i4`.
    I32(Vec<i32>),
    /// `i8`.
    I64(Vec<i64>),
    /// `f4`.
    F32(Vec<f32>),
    /// `f8`.
    F64(Vec<f64>),
}

/// An NPY array: its shape and row-major elements.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The elements.
    pub data: NpyData,
}

impl NpyArray {
    /// The elements as `i64`, for integer arrays.
    pub fn to_i64(&self, file: &Path) -> Result<Vec<i64>, DataError> {
        match &self.data {
            NpyData::U8(v) => Ok(v.iter().map(|&x| i64::from(x)).collect()),
            NpyData::I32(v) => Ok(v.iter().map(|&x| i64::from(x)).collect()),
            NpyData::I64(v) => Ok(v.clone()),
            _ => Err(DataError::Shape {
                file: file.into(),
                detail: "expected integers, found floats".into(),
            }),
        }
    }

    /// The elements as `f32`, for float arrays.
    pub fn to_f32(&self, file: &Path) -> Result<Vec<f32>, DataError> {
        match &self.data {
            NpyData::F32(v) => Ok(v.clone()),
            NpyData::F64(v) => Ok(v.iter().map(|&x| x as f32).collect()),
            _ => Err(DataError::Shape {
                file: file.into(),
                detail: "expected floats, found integers".into(),
            }),
        }
    }
}

const MAGIC: &[u8] = b"\x93NUMPY";

/// Parses an NPY file's bytes; `file` only names it in errors.
pub fn parse_npy(bytes: &[u8], file: &Path) -> Result<NpyArray, DataError> {
    let format = |detail: String| DataError::Format {
        file: file.into(),
        format: "NPY",
        detail,
    };

    // Magic, version, header length (u16 in version 1, u32 after).
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(format("missing the \\x93NUMPY magic string".into()));
    }
    let (len_size, start) = match bytes[6] {
        1 => (2, 8),
        2 | 3 => (4, 8),
        v => {
            return Err(format(format!(
                "unsupported format version {v}.{}",
                bytes[7]
            )));
        }
    };
    if bytes.len() < start + len_size {
        return Err(DataError::Truncated {
            file: file.into(),
            expected: start + len_size,
            got: bytes.len(),
        });
    }
    let header_len = if len_size == 2 {
        usize::from(u16::from_le_bytes([bytes[8], bytes[9]]))
    } else {
        u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize
    };
    let data_start = start + len_size + header_len;
    let header = bytes
        .get(start + len_size..data_start)
        .ok_or(DataError::Truncated {
            file: file.into(),
            expected: data_start,
            got: bytes.len(),
        })?;
    let header = std::str::from_utf8(header).map_err(|_| format("header is not text".into()))?;

    // Header dictionary: descr, fortran_order, shape.
    let descr =
        dict_value(header, "descr").ok_or_else(|| format(format!("no 'descr' in {header:?}")))?;
    let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"');
    let fortran =
        dict_value(header, "fortran_order").ok_or_else(|| format("no 'fortran_order'".into()))?;
    let shape =
        parse_shape(dict_value(header, "shape").ok_or_else(|| format("no 'shape'".into()))?)
            .ok_or_else(|| format(format!("unreadable shape in {header:?}")))?;
    if fortran.trim() == "True" && shape.len() > 1 {
        return Err(format(
            "Fortran-ordered arrays are not supported; save in C order".into(),
        ));
    }
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format(format!("shape {shape:?} overflows")))?;
    let data = decode(descr, &bytes[data_start..], count, file)?;
    Ok(NpyArray { shape, data })
}

/// The text after `'key':` up to the next top-level comma or closing brace.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = header[at + key.len() + 2..]
        .trim_start()
        .strip_prefix(':')?;
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(&rest[..i]),
            _ => {}
        }
    }
    None
}

/// `(5000,)`, `(10, 4096)`, `()` → dimensions.
fn parse_shape(text: &str) -> Option<Vec<usize>> {
    let inner = text.trim().strip_prefix('(')?.strip_suffix(')')?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().ok())
        .collect()
}

fn decode(descr: &str, data: &[u8], count: usize, file: &Path) -> Result<NpyData, DataError> {
    let format = |detail: String| DataError::Format {
        file: file.into(),
        format: "NPY",
        detail,
    };
    let mut chars = descr.chars();
    let (order, kind) = (chars.next(), chars.as_str());
    let little = match order {
        Some('<' | '|' | '=') => true,
        Some('>') => false,
        _ => return Err(format(format!("unsupported dtype {descr:?}"))),
    };
    let width = match kind {
        "u1" | "b1" => 1,
        "i4" | "f4" => 4,
        "i8" | "f8" => 8,
        _ => {
            return Err(format(format!(
                "unsupported dtype {descr:?} (expected u1, i4, i8, f4 or f8)"
            )));
        }
    };
    let expected = count
        .checked_mul(width)
        .ok_or_else(|| format("size overflows".into()))?;
    if data.len() != expected {
        return if data.len() < expected {
            Err(DataError::Truncated {
                file: file.into(),
                expected,
                got: data.len(),
            })
        } else {
            Err(format(format!(
                "{} bytes after the {expected} announced",
                data.len() - expected
            )))
        };
    }
    let words = |w: usize| {
        data.chunks_exact(w).map(move |c| {
            let mut b = [0u8; 8];
            b[..w].copy_from_slice(c);
            if !little {
                b[..w].reverse();
            }
            b
        })
    };
    Ok(match kind {
        "u1" | "b1" => NpyData::U8(data.to_vec()),
        "i4" => NpyData::I32(
            words(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        "f4" => NpyData::F32(
            words(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        "i8" => NpyData::I64(words(8).map(i64::from_le_bytes).collect()),
        _ => NpyData::F64(words(8).map(f64::from_le_bytes).collect()),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    /// An NPY v1.0 file as NumPy writes it: header padded with spaces to a multiple of 64.
    pub(crate) fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut bytes = MAGIC.to_vec();
        bytes.extend([1, 0]);
        bytes.extend((header.len() as u16).to_le_bytes());
        bytes.extend(header.as_bytes());
        bytes.extend(data);
        bytes
    }

    #[test]
    fn reads_int64_vectors_and_float32_matrices() {
        let data: Vec<u8> = [5i64, -3, 59999]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let array = parse_npy(&npy("<i8", "(3,)", &data), Path::new("x")).unwrap();
        assert_eq!(array.shape, vec![3]);
        assert_eq!(array.data, NpyData::I64(vec![5, -3, 59999]));
        let data: Vec<u8> = [1.5f32, -2.0, 0.25, 4.0]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let array = parse_npy(&npy(">f4", "(2, 2)", &data), Path::new("x")).unwrap();
        assert_eq!(array.shape, vec![2, 2]);
        assert_eq!(
            array.to_f32(Path::new("x")).unwrap(),
            vec![1.5, -2.0, 0.25, 4.0]
        );
    }

    #[test]
    fn refuses_bad_magic_truncation_and_unknown_types() {
        let file = Path::new("labels.npy");
        let err = parse_npy(b"PK\x03\x04 not numpy", file)
            .unwrap_err()
            .to_string();
        assert!(err.contains("labels.npy") && err.contains("magic"), "{err}");
        let err = parse_npy(&npy("<i8", "(3,)", &[0; 16]), file).unwrap_err();
        assert!(matches!(
            err,
            DataError::Truncated {
                expected: 24,
                got: 16,
                ..
            }
        ));
        let err = parse_npy(&npy("<c16", "(1,)", &[0; 16]), file)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported dtype"), "{err}");
        let err = parse_npy(&npy("<i8", "(1,)", &[0; 9]), file)
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 bytes after"), "{err}");
    }

    proptest! {
        #[test]
        fn never_panics_on_corrupted_files(
            flip in 0usize..200, value in any::<u8>(), cut in 0usize..200
        ) {
            let data: Vec<u8> = (0..8i64).flat_map(|v| v.to_le_bytes()).collect();
            let mut bytes = npy("<i8", "(2, 4)", &data);
            let at = flip % bytes.len();
            bytes[at] = value;
            bytes.truncate(bytes.len() - cut % bytes.len());
            let _ = parse_npy(&bytes, Path::new("fuzz"));
        }

        #[test]
        fn never_panics_on_arbitrary_headers(header in "\\PC{0,80}") {
            let mut bytes = MAGIC.to_vec();
            bytes.extend([1, 0]);
            bytes.extend((header.len() as u16).to_le_bytes());
            bytes.extend(header.as_bytes());
            let _ = parse_npy(&bytes, Path::new("fuzz"));
        }
    }
}
