//! tch tensors ↔ safetensors bytes, for every file mla reads or writes: dtypes both ways,
//! decoding a checked safetensors file into CPU tensors by name, its index (names, dtypes,
//! shapes), and the one bulk copy of a tensor into bytes that saving is made of. The bytes are
//! untrusted when read: every header check is `mla_storage::formats::safetensors`'s.
//!
//! Not here: which tensors a checkpoint holds (optim/state.rs, checkpoint/), other programs'
//! files (interop/).

use crate::error::BadInput;
use anyhow::{bail, Context};
use mla_storage::formats;
use safetensors::tensor::Dtype;
use serde::Serialize;
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// The safetensors dtype of a tch kind.
pub fn kind_to_dtype(kind: Kind) -> anyhow::Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        k => bail!("no safetensors dtype for {k:?}"),
    })
}

/// Copy the contiguous tensor `src` (any device) into `dst`. Into `fresh` (never touched)
/// memory or from CUDA: libtorch's copy kernel, parallel over the intra-op threads on CPU
/// (first-touch page faults are most of the cost: 2.3× faster than one memcpy on 2 cores) and
/// one device-to-host transfer from CUDA (no intermediate host tensor). Into mapped memory from
/// the CPU: one memcpy, which measured faster there.
pub(crate) fn copy_into(src: &Tensor, dst: &mut [u8], fresh: bool) -> anyhow::Result<()> {
    let numel = src.numel();
    if dst.len() != numel * src.kind().elt_size_in_bytes() || !src.is_contiguous() {
        bail!(
            "snapshot: {} bytes for a {:?} tensor of {numel} elements (contiguous: {})",
            dst.len(),
            src.kind(),
            src.is_contiguous()
        );
    }
    if !fresh && src.device() == tch::Device::Cpu {
        src.f_copy_data_u8(dst, numel)?;
        return Ok(());
    }
    // SAFETY: `view` is a CPU tensor over exactly `dst` (length checked above for this kind),
    // does not own or free it, and is dropped before this function returns, while `dst` is
    // still mutably borrowed.
    let view = unsafe {
        Tensor::f_from_blob(
            dst.as_mut_ptr(),
            &[numel as i64],
            &[1],
            src.kind(),
            tch::Device::Cpu,
        )?
    };
    tch::no_grad(|| view.shallow_clone().f_copy_(&src.view(-1)))?;
    Ok(())
}

/// Parse safetensors bytes into CPU tensors by name, plus the metadata. The bytes are
/// untrusted: every header check happens first (`mla_storage::formats::safetensors`), a
/// failed one is bad input naming `what`.
pub fn from_safetensors(
    bytes: &[u8],
    what: &str,
) -> anyhow::Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let (tensors, metadata) =
        formats::safetensors::read(bytes, what).map_err(|e| BadInput(e.to_string()))?;
    let mut out = HashMap::new();
    for t in tensors {
        let tensor = Tensor::f_from_data_size(t.data, &t.shape, kind_of(t.dtype))
            .with_context(|| format!("{what}: tensor {}", t.name))?;
        out.insert(t.name, tensor);
    }
    Ok((out, metadata))
}

/// The tch kind of a checked file's dtype.
pub fn kind_of(dtype: formats::Dtype) -> Kind {
    use formats::Dtype as D;
    match dtype {
        D::F64 => Kind::Double,
        D::F32 => Kind::Float,
        D::F16 => Kind::Half,
        D::BF16 => Kind::BFloat16,
        D::I64 => Kind::Int64,
        D::I32 => Kind::Int,
        D::I16 => Kind::Int16,
        D::I8 => Kind::Int8,
        D::U8 => Kind::Uint8,
        D::Bool => Kind::Bool,
    }
}

/// One tensor of a safetensors file, from its header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// Tensor names, dtypes and shapes (sorted by name) and the metadata of a safetensors file.
pub fn safetensors_index(
    bytes: &[u8],
    what: &str,
) -> anyhow::Result<(Vec<TensorInfo>, HashMap<String, String>)> {
    let (headers, metadata) =
        formats::safetensors::index(bytes, what).map_err(|e| BadInput(e.to_string()))?;
    let tensors = headers
        .into_iter()
        .map(|h| TensorInfo {
            name: h.name,
            dtype: h.dtype,
            shape: h.shape,
        })
        .collect();
    Ok((tensors, metadata))
}
