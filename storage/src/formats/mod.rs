//! Readers of tensor files that come from outside (issue 23): `torch.save` archives (litgpt's
//! `lit_model.pth`, Hugging Face's `pytorch_model.bin`) and safetensors files (HF weights and
//! mla's own checkpoints). They turn untrusted bytes into checked descriptions — names,
//! dtypes, shapes, strides and the bytes behind them — that the trainer can hand to libtorch
//! without another check. No tch here, so every reader can be fuzzed on its own (`fuzz/`).
//!
//! Every limit on untrusted bytes lives in [`Limits`] (the README's "Security" lists them):
//! * pickles: size, operation count, memory of their values; values live in an arena and
//!   are referenced by index, so
//!   a memoised value is shared, never copied, nesting costs no stack (no recursion in parsing,
//!   printing or dropping) and a list that holds itself is harmless;
//! * archives: one `data.pkl`, unique entry names, a `little` byte order, records no larger
//!   than they say and, in all, at most [`Limits::max_expansion`] × the archive's size;
//! * tensors: every dimension, stride and offset checked, and each tensor's extent
//!   (offset + Σ(size−1)·stride + 1) within its storage, in checked arithmetic, before any byte
//!   is copied; in all, at most two tensors' worth per stored byte (tied weights share one).
//!
//! Not here: building tensors (the trainer's `interop`/`checkpoint`), names and layouts of
//! litgpt/HF (`mla_model::formats`).

mod pickle;
pub mod safetensors;
pub mod torch_save;

/// Element types of the tensors mla reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }
}

/// A file mla cannot read: `file` names it, `problem` says why, in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {problem}")]
pub struct FormatError {
    pub file: String,
    pub problem: String,
}

impl FormatError {
    pub(crate) fn new(file: &str, problem: impl Into<String>) -> Self {
        FormatError {
            file: file.to_string(),
            problem: problem.into(),
        }
    }
}

/// The limits of the readers of untrusted bytes. The defaults read every real model mla has
/// met with room to spare; `MLA_LIMIT_*` variables raise them ([`Limits::from_env`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest pickle (`data.pkl`) read, in bytes (`MLA_LIMIT_PICKLE_BYTES`). A state dict's
    /// pickle holds ~100 bytes per tensor.
    pub max_pickle_bytes: u64,
    /// Most pickle operations run (`MLA_LIMIT_PICKLE_OPS`). A tensor of a state dict takes
    /// ~35; each operation adds at most one value, so this bounds the parser's memory.
    pub max_pickle_ops: u64,
    /// Bytes a pickle's values may take (`MLA_LIMIT_PICKLE_MEMORY`): strings, containers,
    /// memo entries, tensor shapes. Operations that build from existing values (joining two
    /// strings, copying a memoised shape) are charged, so no pickle multiplies its size.
    pub max_pickle_memory: u64,
    /// The storage records of an archive hold at most this many times the archive's size
    /// (`MLA_LIMIT_EXPANSION`): torch.save stores them uncompressed (1×); a deflated record
    /// may not unpack into more memory than this.
    pub max_expansion: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pickle_bytes: 64 << 20,
            max_pickle_ops: 10_000_000,
            max_pickle_memory: 512 << 20,
            max_expansion: 4,
        }
    }
}

/// The environment variables of [`Limits::from_env`].
pub const ENV_LIMIT_PICKLE_BYTES: &str = "MLA_LIMIT_PICKLE_BYTES";
pub const ENV_LIMIT_PICKLE_OPS: &str = "MLA_LIMIT_PICKLE_OPS";
pub const ENV_LIMIT_PICKLE_MEMORY: &str = "MLA_LIMIT_PICKLE_MEMORY";
pub const ENV_LIMIT_EXPANSION: &str = "MLA_LIMIT_EXPANSION";

impl Limits {
    /// The defaults with any `MLA_LIMIT_*` variable applied; one that does not parse as a
    /// whole number ≥ 1 is an error naming it.
    pub fn from_env() -> Result<Limits, FormatError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Limits, FormatError> {
        let mut l = Limits::default();
        let get = |name: &str, into: &mut u64| -> Result<(), FormatError> {
            let Some(v) = var(name).filter(|v| !v.trim().is_empty()) else {
                return Ok(());
            };
            match v.trim().parse::<u64>() {
                Ok(n) if n >= 1 => {
                    *into = n;
                    Ok(())
                }
                _ => Err(FormatError::new(
                    name,
                    format!("{v:?} is not a whole number ≥ 1"),
                )),
            }
        };
        get(ENV_LIMIT_PICKLE_BYTES, &mut l.max_pickle_bytes)?;
        get(ENV_LIMIT_PICKLE_OPS, &mut l.max_pickle_ops)?;
        get(ENV_LIMIT_PICKLE_MEMORY, &mut l.max_pickle_memory)?;
        get(ENV_LIMIT_EXPANSION, &mut l.max_expansion)?;
        Ok(l)
    }
}

/// Elements of `shape`, or None when a dimension is negative or the product passes `i64`.
pub(crate) fn numel(shape: &[i64]) -> Option<i64> {
    shape.iter().try_fold(
        1i64,
        |acc, &d| {
            if d < 0 {
                None
            } else {
                acc.checked_mul(d)
            }
        },
    )
}

/// Highest element index + 1 that a view (`offset`, `shape`, `stride`) touches: offset +
/// Σ(size−1)·stride + 1, or 0 for an empty view; None when it is malformed (negative
/// numbers, unequal lengths) or passes `i64`.
pub(crate) fn extent(offset: i64, shape: &[i64], stride: &[i64]) -> Option<i64> {
    if offset < 0 || shape.len() != stride.len() {
        return None;
    }
    let n = numel(shape)?;
    if n == 0 {
        return Some(0);
    }
    let mut last = offset;
    for (&size, &st) in shape.iter().zip(stride) {
        if st < 0 {
            return None;
        }
        last = last.checked_add((size - 1).checked_mul(st)?)?;
    }
    last.checked_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_is_checked_arithmetic_over_shape_and_stride() {
        assert_eq!(extent(0, &[2, 3], &[3, 1]), Some(6));
        assert_eq!(extent(4, &[2, 3], &[3, 1]), Some(10));
        assert_eq!(extent(0, &[3, 2], &[1, 3]), Some(6), "transposed");
        assert_eq!(extent(7, &[0, 5], &[5, 1]), Some(0), "empty");
        assert_eq!(
            extent(0, &[1 << 20, 1 << 20], &[0, 0]),
            Some(1),
            "broadcast"
        );
        assert_eq!(extent(0, &[], &[]), Some(1), "a scalar");
        assert_eq!(extent(-1, &[2], &[1]), None);
        assert_eq!(extent(0, &[2], &[-1]), None);
        assert_eq!(extent(0, &[2, 2], &[1]), None);
        assert_eq!(extent(0, &[i64::MAX, 2], &[1, 1]), None, "numel passes i64");
        assert_eq!(extent(i64::MAX, &[2], &[1]), None);
        assert_eq!(numel(&[-1, 0]), None);
    }

    #[test]
    fn limits_come_from_the_environment_and_bad_values_name_the_variable() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let l = Limits::from_vars(vars(&[(ENV_LIMIT_PICKLE_OPS, "20000000")])).unwrap();
        assert_eq!(l.max_pickle_ops, 20_000_000);
        assert_eq!(l.max_pickle_bytes, Limits::default().max_pickle_bytes);
        let e = Limits::from_vars(vars(&[(ENV_LIMIT_EXPANSION, "0")])).unwrap_err();
        assert!(e.to_string().starts_with("MLA_LIMIT_EXPANSION: "), "{e}");
    }
}
