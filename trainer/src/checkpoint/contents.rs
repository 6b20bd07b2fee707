//! Is a committed step loadable? The manifest's checksums say the bytes are those that were
//! saved; this says they are a checkpoint of the step's own config: both safetensors headers
//! parse and tile their files exactly, every tensor the model needs is there with its shape
//! and nothing else, the optimizer holds both moments of each, and state.json and config.yaml
//! parse. `mla ckpt verify` and `mla ckpt list --verify` run it after the checksums (issue 14:
//! a manifest-valid but unparsable model.safetensors passed verify, then stopped resume).
//!
//! Reads the two small text files and only the headers of the safetensors files (two ranged
//! reads each), never the tensors. Not here: loading (mod.rs), checksums (mla-storage).

use super::{TrainState, CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, STATE_VERSION};
use crate::config::RunConfig;
use crate::error::BadInput;
use mla_model::{Gpt, ModelConfig};
use mla_storage::{BlockingCheckpointStore, Manifest, StepName};
use std::collections::hash_map::Entry as Slot;
use std::collections::{BTreeMap, HashMap};
use tch::nn::VarStore;
use tch::Device;

/// Largest safetensors header accepted (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// The parameters of `cfg`'s model by litgpt key, with their shapes. Built from a one-layer
/// model on the CPU (every block has the same parameters), so it costs the embeddings and one
/// block, not the whole model.
pub(crate) fn expected_tensors(cfg: &ModelConfig) -> anyhow::Result<BTreeMap<String, Vec<i64>>> {
    let one = ModelConfig {
        n_layer: 1,
        ..cfg.clone()
    };
    let vs = VarStore::new(Device::Cpu);
    tch::no_grad(|| Gpt::new(&vs.root(), &one))?;
    let mut out = BTreeMap::new();
    for (name, t) in vs.variables() {
        match name.strip_prefix("transformer.h.0.") {
            Some(rest) => {
                for i in 0..cfg.n_layer {
                    out.insert(format!("transformer.h.{i}.{rest}"), t.size());
                }
            }
            None => {
                out.insert(name, t.size());
            }
        }
    }
    Ok(out)
}

/// One tensor of a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    dtype: String,
    shape: Vec<i64>,
}

/// A safetensors header, checked against the file's size: tensors in order of their data,
/// back to back from 0 to the end of the file, each exactly `numel × dtype size` bytes.
fn read_header(
    store: &BlockingCheckpointStore,
    step: &StepName,
    name: &str,
    size: u64,
    what: &str,
) -> anyhow::Result<(BTreeMap<String, Entry>, BTreeMap<String, String>)> {
    let bad = |m: String| BadInput(format!("{what}: not a valid safetensors file: {m}"));
    if size < 8 {
        return Err(bad(format!(
            "{size} bytes, shorter than the 8-byte header length"
        ))
        .into());
    }
    let len = store.read_object_range(step, name, 0..8)?;
    let n = u64::from_le_bytes(len[..8].try_into().map_err(|_| bad("short read".into()))?);
    if n > MAX_HEADER_BYTES || 8 + n > size {
        return Err(bad(format!("its header claims {n} bytes, the file has {size}")).into());
    }
    let header = store.read_object_range(step, name, 8..8 + n)?;
    let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("the header is not a JSON object ({e})")))?;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    let mut spans = Vec::new();
    for (key, v) in json {
        if key == "__metadata__" {
            for (k, v) in v.as_object().into_iter().flatten() {
                metadata.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
            }
            continue;
        }
        let parsed = (|| {
            let dtype = v.get("dtype")?.as_str()?.to_string();
            let shape: Vec<i64> = v
                .get("shape")?
                .as_array()?
                .iter()
                .map(|d| d.as_i64().filter(|d| *d >= 0))
                .collect::<Option<_>>()?;
            let offsets = v.get("data_offsets")?.as_array()?;
            let (a, b) = (offsets.first()?.as_u64()?, offsets.get(1)?.as_u64()?);
            Some((dtype, shape, a, b))
        })();
        let (dtype, shape, a, b) =
            parsed.ok_or_else(|| bad(format!("tensor {key}: malformed entry")))?;
        let elt = match dtype.as_str() {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "I8" | "U8" | "BOOL" => 1,
            other => return Err(bad(format!("tensor {key}: unknown dtype {other}")).into()),
        };
        let numel: i64 = shape.iter().product();
        if b < a || b - a != numel as u64 * elt {
            return Err(bad(format!(
                "tensor {key}: data_offsets [{a}, {b}] do not hold {numel} {dtype} values"
            ))
            .into());
        }
        spans.push((a, b, key.clone()));
        tensors.insert(key, Entry { dtype, shape });
    }
    spans.sort();
    let mut at = 0;
    for (a, b, key) in &spans {
        if *a != at {
            return Err(bad(format!(
                "tensor {key} starts at byte {a} of the data, expected {at} (gap or overlap)"
            ))
            .into());
        }
        at = *b;
    }
    if at != size - 8 - n {
        return Err(bad(format!(
            "the tensors end at byte {at} of the data, the file holds {}",
            size - 8 - n
        ))
        .into());
    }
    Ok((tensors, metadata))
}

/// Checks steps' contents, building each distinct model's expected tensors once: the steps of
/// a listing usually share one config, and building even one layer of it costs the embeddings.
#[derive(Default)]
pub(crate) struct ContentsCheck {
    expected: HashMap<String, BTreeMap<String, Vec<i64>>>,
}

impl ContentsCheck {
    /// Check that `step` (committed, with `manifest`) is a loadable checkpoint of its config;
    /// one line naming the object and the problem otherwise (exit 2).
    pub(crate) fn check(
        &mut self,
        store: &BlockingCheckpointStore,
        step: &StepName,
        manifest: &Manifest,
    ) -> anyhow::Result<()> {
        check_contents(store, step, manifest, &mut self.expected)
    }
}

fn check_contents(
    store: &BlockingCheckpointStore,
    step: &StepName,
    manifest: &Manifest,
    models: &mut HashMap<String, BTreeMap<String, Vec<i64>>>,
) -> anyhow::Result<()> {
    let url = store.store().step_url(step);
    let text = |name: &str| -> anyhow::Result<String> {
        if manifest.object(name).is_none() {
            return Err(BadInput(format!("{url}: checkpoint has no {name}")).into());
        }
        Ok(String::from_utf8_lossy(&store.read_object(step, name)?).into_owned())
    };
    let cfg = RunConfig::from_yaml(&text(CONFIG_FILE)?, &format!("{url}/{CONFIG_FILE}"), &[])?;
    let state: TrainState = serde_json::from_str(&text(STATE_FILE)?)
        .map_err(|e| BadInput(format!("{url}/{STATE_FILE}: invalid: {e}")))?;
    if state.version != STATE_VERSION {
        return Err(BadInput(format!(
            "{url}/{STATE_FILE}: state version {} (this mla reads {STATE_VERSION})",
            state.version
        ))
        .into());
    }
    let expected = match models.entry(super::config_digest(&cfg)) {
        Slot::Occupied(e) => e.into_mut(),
        Slot::Vacant(v) => v.insert(expected_tensors(cfg.model())?),
    };
    let header = |name: &str| {
        let entry = manifest
            .object(name)
            .ok_or_else(|| BadInput(format!("{url}: checkpoint has no {name}")))?;
        read_header(
            store,
            step,
            name,
            entry.size_bytes,
            &format!("{url}/{name}"),
        )
    };

    let what = format!("{url}/{MODEL_FILE}");
    let (model, _) = header(MODEL_FILE)?;
    check_names(&what, &model, expected, &[""], &["F32", "BF16"])?;
    let what = format!("{url}/{OPTIMIZER_FILE}");
    let (moments, meta) = header(OPTIMIZER_FILE)?;
    check_names(
        &what,
        &moments,
        expected,
        &["exp_avg.", "exp_avg_sq."],
        &["F32"],
    )?;
    if meta
        .get("step")
        .and_then(|s| s.parse::<u64>().ok())
        .is_none()
    {
        return Err(BadInput(format!("{what}: metadata has no step count")).into());
    }
    Ok(())
}

/// Every `<prefix><name>` of `expected` is in `got` with its shape and one of `dtypes`, and
/// `got` has nothing else.
fn check_names(
    what: &str,
    got: &BTreeMap<String, Entry>,
    expected: &BTreeMap<String, Vec<i64>>,
    prefixes: &[&str],
    dtypes: &[&str],
) -> Result<(), BadInput> {
    for prefix in prefixes {
        for (name, shape) in expected {
            let key = format!("{prefix}{name}");
            let e = got.get(&key).ok_or_else(|| {
                BadInput(format!(
                    "{what}: missing tensor {key} that the step's config.yaml model needs"
                ))
            })?;
            if &e.shape != shape {
                return Err(BadInput(format!(
                    "{what}: tensor {key} has shape {:?}, the step's config.yaml model needs {shape:?}",
                    e.shape
                )));
            }
            if !dtypes.contains(&e.dtype.as_str()) {
                return Err(BadInput(format!(
                    "{what}: tensor {key} is {}, expected {}",
                    e.dtype,
                    dtypes.join(" or ")
                )));
            }
        }
    }
    let known = |k: &str| {
        prefixes
            .iter()
            .any(|p| k.strip_prefix(p).is_some_and(|n| expected.contains_key(n)))
    };
    if let Some(extra) = got.keys().find(|k| !known(k)) {
        return Err(BadInput(format!(
            "{what}: tensor {extra} is not a parameter of the step's config.yaml model"
        )));
    }
    Ok(())
}
