//! safetensors files (mla's checkpoints, Hugging Face weights) read into checked tensors: the
//! `safetensors` crate checks the header (size cap, offsets that tile the data, element counts
//! in checked arithmetic); this adds what a tensor library needs before it allocates: every
//! dimension fits `i64` (a shape `[0, 2^64−1]` has zero elements and passes the crate, then
//! wraps to −1 as a torch size: issue 23, finding 6) and the dtype is one mla reads.
//!
//! Not here: building tensors (the trainer's `checkpoint`).

use std::collections::HashMap;

use ::safetensors::tensor::{Dtype as StDtype, SafeTensors};

use super::{Dtype, FormatError};

/// One tensor of a safetensors file: its name, dtype, shape and bytes (`numel × size`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<i64>,
    pub data: &'a [u8],
}

/// One entry of a header: name, dtype as the file spells it, shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

fn dtype(d: StDtype) -> Option<Dtype> {
    Some(match d {
        StDtype::F64 => Dtype::F64,
        StDtype::F32 => Dtype::F32,
        StDtype::F16 => Dtype::F16,
        StDtype::BF16 => Dtype::BF16,
        StDtype::I64 => Dtype::I64,
        StDtype::I32 => Dtype::I32,
        StDtype::I16 => Dtype::I16,
        StDtype::I8 => Dtype::I8,
        StDtype::U8 => Dtype::U8,
        StDtype::BOOL => Dtype::Bool,
        _ => return None,
    })
}

fn invalid(what: &str, e: impl std::fmt::Debug) -> FormatError {
    FormatError::new(what, format!("not a valid safetensors file ({e:?})"))
}

/// The shape of `name` as torch sizes: each dimension, and the element count, within `i64`.
fn shape(name: &str, dims: &[usize], what: &str) -> Result<Vec<i64>, FormatError> {
    let shape: Option<Vec<i64>> = dims.iter().map(|&d| i64::try_from(d).ok()).collect();
    shape.filter(|s| super::numel(s).is_some()).ok_or_else(|| {
        FormatError::new(
            what,
            format!("tensor {name} has shape {dims:?}, larger than any tensor can be"),
        )
    })
}

/// Every tensor of the safetensors `bytes` (in the file's data order) and the metadata.
pub fn read<'a>(
    bytes: &'a [u8],
    what: &str,
) -> Result<(Vec<Tensor<'a>>, HashMap<String, String>), FormatError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| invalid(what, e))?;
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| invalid(what, e))?;
    let mut out = Vec::new();
    for (name, view) in st.iter() {
        let d = dtype(view.dtype()).ok_or_else(|| {
            FormatError::new(
                what,
                format!("tensor {name}: dtype {:?} is not supported", view.dtype()),
            )
        })?;
        out.push(Tensor {
            name: name.to_string(),
            dtype: d,
            shape: shape(name, view.shape(), what)?,
            data: view.data(),
        });
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

/// The header alone: entries sorted by name, and the metadata (for `mla ckpt inspect`).
pub fn index(
    bytes: &[u8],
    what: &str,
) -> Result<(Vec<Header>, HashMap<String, String>), FormatError> {
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| invalid(what, e))?;
    let mut headers: Vec<Header> = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| Header {
            name,
            dtype: format!("{:?}", info.dtype),
            shape: info.shape.clone(),
        })
        .collect();
    headers.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((headers, meta.metadata().clone().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file with one tensor of `dtype`, `shape` and `data`, header written by hand.
    pub(crate) fn file(dtype: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let header = format!(
            r#"{{"w":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[0,{}]}}}}"#,
            data.len()
        );
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn a_plain_file_reads_back() {
        let bytes = file("F32", "[2]", &[0, 0, 128, 63, 0, 0, 0, 64]);
        let (t, _) = read(&bytes, "m.safetensors").unwrap();
        assert_eq!(t[0].name, "w");
        assert_eq!((t[0].dtype, t[0].shape.as_slice()), (Dtype::F32, &[2][..]));
        assert_eq!(t[0].data.len(), 8);
    }

    /// Issue 23, finding 6.
    #[test]
    fn a_dimension_past_i64_is_refused_even_with_zero_elements() {
        let bytes = file("F32", "[0, 18446744073709551615]", &[]);
        let e = read(&bytes, "m.safetensors").unwrap_err().to_string();
        assert!(
            e.contains("tensor w has shape [0, 18446744073709551615]"),
            "{e}"
        );
        let bytes = file("F32", "[4294967296, 4294967296]", &[]);
        assert!(read(&bytes, "m.safetensors").is_err());
    }

    #[test]
    fn broken_headers_and_unknown_dtypes_are_errors() {
        let e = read(b"\xff\xff\xff\xff\xff\xff\xff\xff{}", "m")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("m: not a valid safetensors file"), "{e}");
        let bytes = file("F32", "[3]", &[0; 8]);
        assert!(read(&bytes, "m").is_err(), "data shorter than the shape");
        let bytes = file("F8_E4M3", "[2]", &[0; 2]);
        let e = read(&bytes, "m").unwrap_err().to_string();
        assert!(e.contains("dtype F8_E4M3 is not supported"), "{e}");
    }
}
