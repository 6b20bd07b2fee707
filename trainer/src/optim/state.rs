//! The flat buffers' state as checkpoint objects, and back: the weights by litgpt key
//! (`model.safetensors`) and AdamW's moments (`optimizer.safetensors`: `exp_avg.<key>`,
//! `exp_avg_sq.<key>`, the step count in the metadata), written straight from the flat
//! buffers (one bulk copy each) and read back checked against the model's entries before
//! anything is copied. A sharded rank restores its slice of the whole moments.
//!
//! Not here: the other objects of a step and the manifest (checkpoint/), tensor bytes in
//! general (tensors.rs), gathering sharded moments for a save (optim/sync.rs).

use super::{copy_flat_range, AdamW, FlatEntry, FlatParams, Moments};
use crate::error::BadInput;
use crate::tensors::{copy_into, from_safetensors, kind_to_dtype};
use anyhow::bail;
use mla_storage::BytesMut;
use std::collections::HashMap;
use tch::Tensor;

/// Safetensors bytes of flat buffers laid out back to back: for each `(prefix, buffer)` one
/// tensor `<prefix><entry name>` per entry, at the entry's offset. Because the entries tile
/// each buffer, the data section is the buffers themselves: one bulk copy per buffer straight
/// into the output, which is the whole blocking cost of a save.
///
/// `reuse`: the buffer of an earlier snapshot, overwritten in place when large enough. Its
/// pages are already mapped, so the copy runs at memory speed; a fresh allocation pays a page
/// fault (and the kernel's zeroing) per 4 KiB page on first touch — most of a first save.
fn flat_safetensors(
    buffers: &[(&str, &Tensor)],
    entries: &[FlatEntry],
    metadata: &HashMap<String, String>,
    reuse: Option<BytesMut>,
) -> anyhow::Result<BytesMut> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    let mut data_bytes = 0usize;
    for (prefix, buf) in buffers {
        let elt = buf.kind().elt_size_in_bytes();
        let dtype = format!("{:?}", kind_to_dtype(buf.kind())?);
        let mut covered = 0i64;
        for e in entries {
            if e.offset != covered {
                bail!("flat buffer entries do not tile the buffer at {}", e.name);
            }
            covered += e.numel();
            let begin = data_bytes + e.offset as usize * elt;
            let end = begin + e.numel() as usize * elt;
            header.insert(
                format!("{prefix}{}", e.name),
                serde_json::json!({ "dtype": dtype, "shape": e.shape, "data_offsets": [begin, end] }),
            );
        }
        if covered as usize != buf.numel() {
            bail!(
                "flat buffer {prefix}: entries cover {covered} of {} elements",
                buf.numel()
            );
        }
        data_bytes += buf.numel() * elt;
    }
    let mut header = serde_json::to_vec(&header)?;
    // Pad with spaces to 8 bytes, as the safetensors writer does, so data stays aligned.
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let start = 8 + header.len();
    let total = start + data_bytes;
    let (mut out, fresh) = match reuse {
        // Keep the old bytes (all overwritten below) rather than zeroing them again.
        Some(mut b) if b.capacity() >= total => {
            if b.len() >= total {
                b.truncate(total);
            } else {
                b.resize(total, 0);
            }
            (b, false)
        }
        // Zeroed allocation: fresh pages, no memset; the copies below touch each byte once.
        _ => (BytesMut::zeroed(total), true),
    };
    out[..8].copy_from_slice(&(header.len() as u64).to_le_bytes());
    out[8..start].copy_from_slice(&header);
    let mut at = start;
    for (_, buf) in buffers {
        let n = buf.numel() * buf.kind().elt_size_in_bytes();
        copy_into(buf, &mut out[at..at + n], fresh)?;
        at += n;
    }
    Ok(out)
}

/// Model weights by litgpt key, from the flat buffer (into `reuse` when it fits).
pub fn model_bytes(flat: &FlatParams, reuse: Option<BytesMut>) -> anyhow::Result<BytesMut> {
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    flat_safetensors(&[("", &flat.params)], &flat.entries, &meta, reuse)
}

/// AdamW moments by `exp_avg.<key>` / `exp_avg_sq.<key>`, the step count in the metadata.
pub fn optimizer_bytes(
    flat: &FlatParams,
    opt: Moments,
    reuse: Option<BytesMut>,
) -> anyhow::Result<BytesMut> {
    let meta = HashMap::from([("step".to_string(), opt.step.to_string())]);
    flat_safetensors(
        &[("exp_avg.", opt.exp_avg), ("exp_avg_sq.", opt.exp_avg_sq)],
        &flat.entries,
        &meta,
        reuse,
    )
}

/// The tensors of `bytes` in `entries` order, named `<prefix><entry name>`, each checked for
/// presence and shape (and none left over when `exact`), before anything is copied: a
/// checkpoint that fails half-way must not leave a half-loaded model behind (resume falls
/// back to an older step, or starts fresh, with the buffers as they were).
fn tensors_for(
    entries: &[FlatEntry],
    tensors: &HashMap<String, Tensor>,
    prefixes: &[&str],
    what: &str,
) -> Result<Vec<Tensor>, BadInput> {
    let mut out = Vec::with_capacity(entries.len() * prefixes.len());
    for prefix in prefixes {
        for e in entries {
            let key = format!("{prefix}{}", e.name);
            let t = tensors.get(&key).ok_or_else(|| {
                BadInput(format!(
                    "{what}: missing tensor {key} (a checkpoint of another model?)"
                ))
            })?;
            if t.size() != e.shape {
                return Err(BadInput(format!(
                    "{what}: tensor {key} has shape {:?}, the model needs {:?} (a checkpoint of another model shape?)",
                    t.size(),
                    e.shape
                )));
            }
            out.push(t.shallow_clone());
        }
    }
    if let Some(extra) = tensors.keys().find(|k| {
        !prefixes.iter().any(|p| {
            k.strip_prefix(p)
                .is_some_and(|n| entries.iter().any(|e| e.name == n))
        })
    }) {
        return Err(BadInput(format!(
            "{what}: tensor {extra} is not a parameter of this model"
        )));
    }
    Ok(out)
}

/// Copy `tensors` (from [`tensors_for`], `entries` order per buffer) into the flat buffers.
fn copy_into_flat(entries: &[FlatEntry], buffers: &[&Tensor], tensors: &[Tensor]) {
    let n = entries.len();
    tch::no_grad(|| {
        for (b, buf) in buffers.iter().enumerate() {
            for (e, t) in entries.iter().zip(&tensors[b * n..(b + 1) * n]) {
                buf.narrow(0, e.offset, e.numel())
                    .view(e.shape.as_slice())
                    .copy_(t);
            }
        }
    });
}

/// Copy weights by name into the flat buffer; every parameter must be present with its
/// shape (all checked before anything is copied).
pub fn load_model(flat: &FlatParams, bytes: &[u8], what: &str) -> anyhow::Result<()> {
    let (tensors, _) = from_safetensors(bytes, what)?;
    load_weights(flat, &tensors, what)?;
    Ok(())
}

/// Copy `tensors` (by litgpt name) into the flat buffer: every parameter present with its
/// shape and nothing else, all checked before anything is copied.
pub fn load_weights(
    flat: &FlatParams,
    tensors: &HashMap<String, Tensor>,
    what: &str,
) -> Result<(), BadInput> {
    let ordered = tensors_for(&flat.entries, tensors, &[""], what)?;
    copy_into_flat(&flat.entries, &[&flat.params], &ordered);
    Ok(())
}

/// The AdamW moments and step count of an optimizer file, checked against `flat`.
fn parse_optimizer(
    flat: &FlatParams,
    bytes: &[u8],
    what: &str,
) -> anyhow::Result<(Vec<Tensor>, u64)> {
    let (tensors, meta) = from_safetensors(bytes, what)?;
    let ordered = tensors_for(&flat.entries, &tensors, &["exp_avg.", "exp_avg_sq."], what)?;
    let step = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| BadInput(format!("{what}: metadata has no step")))?;
    Ok((ordered, step))
}

/// A checkpoint's weights and moments, parsed and checked against the flat buffers, not yet
/// copied: [`ParsedState::apply`] copies them only when the rest of the step is good too.
pub struct ParsedState {
    weights: Vec<Tensor>,
    moments: Vec<Tensor>,
    step: u64,
}

impl ParsedState {
    /// Parse `model.safetensors` and `optimizer.safetensors` (named `model_what`,
    /// `optimizer_what` in errors) for `flat`.
    pub fn parse(
        flat: &FlatParams,
        model: &[u8],
        model_what: &str,
        optimizer: &[u8],
        optimizer_what: &str,
    ) -> anyhow::Result<ParsedState> {
        let (model_tensors, _) = from_safetensors(model, model_what)?;
        let weights = tensors_for(&flat.entries, &model_tensors, &[""], model_what)?;
        let (moments, step) = parse_optimizer(flat, optimizer, optimizer_what)?;
        Ok(ParsedState {
            weights,
            moments,
            step,
        })
    }

    /// Copy the weights into `flat`, the moments (or this rank's slice of them) and the step
    /// count into `opt`.
    pub fn apply(self, flat: &FlatParams, opt: &mut AdamW) {
        copy_into_flat(&flat.entries, &[&flat.params], &self.weights);
        copy_moments(flat, opt, &self.moments);
        opt.step = self.step;
    }
}

/// Copy the whole moments of a checkpoint ([`parse_optimizer`]'s, `entries` order, exp_avg
/// then exp_avg_sq) into `opt`: all of them, or this rank's slice when sharded (ZeRO).
fn copy_moments(flat: &FlatParams, opt: &AdamW, moments: &[Tensor]) {
    let (lo, hi) = flat.owned();
    let n = flat.entries.len();
    for (buf, saved) in [
        (&opt.exp_avg, &moments[..n]),
        (&opt.exp_avg_sq, &moments[n..]),
    ] {
        copy_flat_range(&flat.entries, saved, lo, &buf.narrow(0, 0, hi - lo));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dist::Sharding;
    use crate::tensors::safetensors_index;
    use tch::Kind;

    /// Flat buffers over random parameters of `shapes` (also for checkpoint/'s tests).
    pub(crate) fn flat_of(shapes: &[(&str, &[i64])], kind: Kind) -> FlatParams {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        for (name, shape) in shapes {
            let _ = vs.root().randn(name, shape, 0.0, 1.0);
        }
        FlatParams::new(&vs, kind).unwrap()
    }

    #[test]
    fn flat_safetensors_round_trip_through_the_safetensors_reader() {
        let flat = flat_of(&[("w", &[3, 4]), ("b", &[4]), ("e", &[5, 2])], Kind::Float);
        let bytes = model_bytes(&flat, None).unwrap();
        let (tensors, meta) = from_safetensors(&bytes, "model").unwrap();
        assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
        assert_eq!(tensors.len(), 3);
        for e in &flat.entries {
            let t = &tensors[&e.name];
            assert_eq!(t.size(), e.shape);
            assert!(t.equal(&flat.param_view(e)), "{}", e.name);
        }
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(header_len % 8, 0);
        let (index, _) = safetensors_index(&bytes, "model").unwrap();
        let names: Vec<&str> = index.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "e", "w"]);
        assert_eq!(index[2].shape, [3, 4]);
        assert_eq!(index[2].dtype, "F32");
    }

    #[test]
    fn optimizer_state_round_trips_with_its_step() {
        let flat = flat_of(&[("w", &[3, 4]), ("b", &[4])], Kind::Float);
        let mut opt = AdamW::new(&flat, (0.9, 0.95), 1e-8, 0.1);
        let _ = flat.grads.shallow_clone().fill_(0.5);
        opt.step(&flat, 1e-3).unwrap();
        opt.step(&flat, 1e-3).unwrap();
        let bytes = optimizer_bytes(&flat, opt.moments(), None).unwrap();
        let other = AdamW::new(&flat, (0.9, 0.95), 1e-8, 0.1);
        let (moments, step) = parse_optimizer(&flat, &bytes, "opt").unwrap();
        copy_into_flat(
            &flat.entries,
            &[&other.exp_avg, &other.exp_avg_sq],
            &moments,
        );
        assert_eq!(step, 2);
        assert!(other.exp_avg.equal(&opt.exp_avg));
        assert!(other.exp_avg_sq.equal(&opt.exp_avg_sq));
    }

    /// A sharded rank restores its slice of the whole moments an unsharded run saved (and a
    /// sharded one gathers): every rank of 3, the last one's slice cut short by the padding.
    #[test]
    fn a_sharded_rank_restores_its_slice_of_the_whole_moments() {
        let shapes: [(&str, &[i64]); 2] = [("w", &[3, 4]), ("b", &[4])];
        let flat = flat_of(&shapes, Kind::Float);
        let mut opt = AdamW::new(&flat, (0.9, 0.95), 1e-8, 0.1);
        flat.grads
            .shallow_clone()
            .copy_(&Tensor::arange(16, (Kind::Float, tch::Device::Cpu)));
        opt.step(&flat, 1e-3).unwrap();
        let bytes = optimizer_bytes(&flat, opt.moments(), None).unwrap();
        for rank in 0..3 {
            let vs = tch::nn::VarStore::new(tch::Device::Cpu);
            for (name, shape) in shapes {
                let _ = vs.root().zeros(name, shape);
            }
            let sharded =
                FlatParams::sharded(&vs, Kind::Float, Sharding::Gradients, rank, 3).unwrap();
            let mine = AdamW::new(&sharded, (0.9, 0.95), 1e-8, 0.1);
            assert_eq!(mine.exp_avg.size(), [6], "⌈16 / 3⌉ elements per rank");
            let (moments, _) = parse_optimizer(&sharded, &bytes, "opt").unwrap();
            copy_moments(&sharded, &mine, &moments);
            let (lo, hi) = sharded.owned();
            assert_eq!((lo, hi), (6 * rank as i64, (6 * rank as i64 + 6).min(16)));
            for (got, whole) in [
                (&mine.exp_avg, &opt.exp_avg),
                (&mine.exp_avg_sq, &opt.exp_avg_sq),
            ] {
                assert!(got
                    .narrow(0, 0, hi - lo)
                    .equal(&whole.narrow(0, lo, hi - lo)));
                let pad = got.narrow(0, hi - lo, 6 - (hi - lo));
                assert_eq!(pad.abs().sum(Kind::Float).double_value(&[]), 0.0);
            }
        }
    }

    #[test]
    fn a_reused_buffer_gives_the_same_bytes_as_a_fresh_one() {
        let flat = flat_of(&[("w", &[3, 4]), ("b", &[4])], Kind::Float);
        let mut opt = AdamW::new(&flat, (0.9, 0.95), 1e-8, 0.1);
        let first = optimizer_bytes(&flat, opt.moments(), None).unwrap();
        let ptr = first.as_ptr();
        for steps in [1, 10] {
            // A longer step number in the metadata changes the header length.
            while opt.step < steps {
                let _ = flat.grads.shallow_clone().fill_(0.5);
                opt.step(&flat, 1e-3).unwrap();
            }
            let fresh = optimizer_bytes(&flat, opt.moments(), None).unwrap();
            let mut dirty = BytesMut::from(&vec![0xAB; fresh.len() + 64][..]);
            dirty.truncate(fresh.len() - 8);
            let reused = optimizer_bytes(&flat, opt.moments(), Some(dirty)).unwrap();
            assert_eq!(reused, fresh, "after {steps} steps");
        }
        let again = optimizer_bytes(&flat, opt.moments(), Some(first)).unwrap();
        assert_eq!(again.as_ptr(), ptr, "written in place");
    }

    #[test]
    fn bf16_weights_keep_their_dtype() {
        let flat = flat_of(&[("w", &[2, 8])], Kind::BFloat16);
        let bytes = model_bytes(&flat, None).unwrap();
        let (index, _) = safetensors_index(&bytes, "model").unwrap();
        assert_eq!(index[0].dtype, "BF16");
        let other = flat_of(&[("w", &[2, 8])], Kind::BFloat16);
        load_model(&other, &bytes, "model").unwrap();
        assert!(other.params.equal(&flat.params));
    }

    #[test]
    fn loading_weights_of_another_shape_is_bad_input_naming_the_tensor() {
        let flat = flat_of(&[("w", &[3, 4])], Kind::Float);
        let bytes = model_bytes(&flat, None).unwrap();
        let other = flat_of(&[("w", &[4, 4])], Kind::Float);
        let e = load_model(&other, &bytes, "ckpt/model.safetensors").unwrap_err();
        assert!(e.is::<BadInput>());
        assert!(e.to_string().contains("tensor w has shape [3, 4]"), "{e}");
    }
}
