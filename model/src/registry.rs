//! Named model configs, as litgpt's `config.py` registry: `model_name: pythia-160m`
//! resolves here. Only architectures mla builds are listed: the pythia family and litgpt's
//! TinyLlama-block models (the values are litgpt 0.5.13's).

use crate::config::{MlpClass, ModelConfig, NormClass};

fn pythia(
    name: &str,
    block_size: usize,
    n_layer: usize,
    n_embd: usize,
    n_head: usize,
    padding_multiple: usize,
) -> ModelConfig {
    ModelConfig {
        name: name.to_string(),
        hf_config: hf("EleutherAI", name),
        block_size,
        n_layer,
        n_embd,
        n_head,
        padding_multiple,
        ..ModelConfig::default()
    }
}

fn hf(org: &str, name: &str) -> std::collections::BTreeMap<String, String> {
    [("org", org), ("name", name)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// litgpt's TinyLlama-family block: RMSNorm, SwiGLU (LLaMAMLP), sequential residual, no bias,
/// full rotary, 4 query groups, the Llama-2 vocabulary.
fn tiny_llama_family(
    name: &str,
    hf_org: &str,
    hf_name: &str,
    n_layer: usize,
    n_head: usize,
    n_embd: usize,
) -> ModelConfig {
    ModelConfig {
        name: name.to_string(),
        hf_config: hf(hf_org, hf_name),
        block_size: 2048,
        vocab_size: 32000,
        padding_multiple: 64,
        n_layer,
        n_head,
        n_embd,
        rotary_percentage: 1.0,
        parallel_residual: false,
        bias: false,
        norm_class_name: NormClass::RMSNorm,
        norm_eps: 1e-5,
        mlp_class_name: MlpClass::LLaMAMLP,
        intermediate_size: Some(5632),
        n_query_groups: Some(4),
        ..ModelConfig::default()
    }
}

/// Every named config, in litgpt 0.5.13's order: the pythia family (with the `-deduped`
/// twins of 70m and up, trained on the deduplicated Pile: the same architecture), then the
/// TinyLlama-block models of litgpt's `config_hub/pretrain` (tiny-llama-1.1b, micro-llama-300M).
/// Fields not set here are litgpt's `Config` defaults, as in litgpt.
pub fn all() -> Vec<ModelConfig> {
    let base = vec![
        pythia("pythia-14m", 512, 6, 128, 4, 128),
        pythia("pythia-31m", 1024, 6, 256, 8, 128),
        pythia("pythia-70m", 2048, 6, 512, 8, 128),
        pythia("pythia-160m", 2048, 12, 768, 12, 128),
        pythia("pythia-410m", 2048, 24, 1024, 16, 128),
        pythia("pythia-1b", 2048, 16, 2048, 8, 128),
        pythia("pythia-1.4b", 2048, 24, 2048, 16, 128),
        pythia("pythia-2.8b", 2048, 32, 2560, 32, 128),
        pythia("pythia-6.9b", 2048, 32, 4096, 32, 256),
        pythia("pythia-12b", 2048, 36, 5120, 40, 512),
    ];
    let deduped: Vec<ModelConfig> = base
        .iter()
        .filter(|c| !matches!(c.name.as_str(), "pythia-14m" | "pythia-31m"))
        .map(|c| {
            let name = format!("{}-deduped", c.name);
            ModelConfig {
                name: name.clone(),
                hf_config: hf("EleutherAI", &name),
                ..c.clone()
            }
        })
        .collect();
    let mut all = base;
    all.extend(deduped);
    all.push(tiny_llama_family(
        "tiny-llama-1.1b",
        "TinyLlama",
        "TinyLlama-1.1B-intermediate-step-1431k-3T",
        22,
        32,
        2048,
    ));
    all.push(tiny_llama_family(
        "tiny-llama-1.1b-chat",
        "TinyLlama",
        "TinyLlama-1.1B-Chat-v1.0",
        22,
        32,
        2048,
    ));
    all.push(tiny_llama_family(
        "micro-llama-300M",
        "keeeeenw",
        "MicroLlama",
        12,
        16,
        1024,
    ));
    all
}

/// The config named `name`, or by its Hugging Face id (`EleutherAI/pythia-160m`), as litgpt
/// accepts both.
pub fn find(name: &str) -> Option<ModelConfig> {
    all().into_iter().find(|c| {
        c.name == name
            || matches!((c.hf_config.get("org"), c.hf_config.get("name")),
                (Some(o), Some(n)) if format!("{o}/{n}") == name)
    })
}

/// Names, for error messages and `--help`.
pub fn names() -> Vec<String> {
    all().into_iter().map(|c| c.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_resolves_under_a_unique_name_and_is_found_by_its_hf_id() {
        let all = all();
        let mut names: Vec<&str> = all.iter().map(|c| c.name.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len(), "unique names");
        for c in &all {
            c.clone()
                .resolve()
                .unwrap_or_else(|e| panic!("{}: {e}", c.name));
            let id = format!("{}/{}", c.hf_config["org"], c.hf_config["name"]);
            assert_eq!(find(&id).as_ref(), Some(c), "{id}");
        }
        let (a, b) = (
            find("pythia-12b").unwrap(),
            find("pythia-12b-deduped").unwrap(),
        );
        assert_eq!(
            a.clone()
                .resolve()
                .unwrap()
                .differences(&b.resolve().unwrap()),
            []
        );
        assert_eq!(
            a.padding_multiple, 512,
            "litgpt's default: pythia-12b does not set it"
        );
        assert!(find("pythia-14m-deduped").is_none(), "litgpt has none");
    }
}
