//! Tensors of a `torch.save` file: litgpt's `lit_model.pth` (a state dict, or a training
//! checkpoint whose `model` entry is one) and Hugging Face's `pytorch_model.bin`.
//!
//! The file is untrusted: `mla_storage::formats::torch_save` reads the archive and its pickle
//! under the limits of `formats::Limits` and checks every view against its storage before a
//! byte is copied; here the checked storages become tensors and each view is cut from its
//! storage. A file that fails a check is bad input (one line, exit 2).
//!
//! Not here: what the names mean (interop/import.rs).

use crate::error::BadInput;
use crate::tensors::kind_of;
use anyhow::Context;
use mla_storage::formats::{torch_save, Limits};
use std::path::Path;
use tch::Tensor;

/// The tensors of the state dict in the `torch.save` file `path`, by name in file order. A
/// dict whose `model` entry is a dict (litgpt's training checkpoints) gives that entry's.
pub fn load_state_dict(path: &Path) -> anyhow::Result<Vec<(String, Tensor)>> {
    let limits = Limits::from_env().map_err(|e| BadInput(e.to_string()))?;
    let sd = torch_save::read_file(path, &limits).map_err(|e| BadInput(e.to_string()))?;
    let what = path.display();
    let mut storages = Vec::with_capacity(sd.storages.len());
    for s in sd.storages {
        // Each record's bytes are freed as soon as its tensor holds a copy.
        let t = Tensor::f_from_data_size(&s.bytes, &[s.numel()], kind_of(s.dtype))
            .with_context(|| format!("{what}: storage {}", s.key))?;
        storages.push(t);
    }
    sd.tensors
        .into_iter()
        .map(|v| {
            // In bounds by the reader's checks: as_strided cannot read past the storage.
            let view = storages[v.storage]
                .f_as_strided(v.shape.as_slice(), v.stride.as_slice(), Some(v.offset))
                .with_context(|| format!("{what}: {}", v.name))?;
            Ok((v.name, view.contiguous()))
        })
        .collect()
}
