//! Named model configs, as litgpt's `config.py` registry: `model_name: pythia-160m`
//! resolves here. Only architectures mla builds are listed (the pythia family).

use crate::config::ModelConfig;

fn pythia(
    name: &str,
    block_size: usize,
    n_layer: usize,
    n_embd: usize,
    n_head: usize,
) -> ModelConfig {
    ModelConfig {
        name: name.to_string(),
        hf_config: [("org", "EleutherAI"), ("name", name)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        block_size,
        n_layer,
        n_embd,
        n_head,
        padding_multiple: 128,
        ..ModelConfig::default()
    }
}

/// Every named config, in litgpt's order.
pub fn all() -> Vec<ModelConfig> {
    vec![
        pythia("pythia-14m", 512, 6, 128, 4),
        pythia("pythia-31m", 1024, 6, 256, 8),
        pythia("pythia-70m", 2048, 6, 512, 8),
        pythia("pythia-160m", 2048, 12, 768, 12),
        pythia("pythia-410m", 2048, 24, 1024, 16),
        pythia("pythia-1b", 2048, 16, 2048, 8),
        pythia("pythia-1.4b", 2048, 24, 2048, 16),
    ]
}

/// The config named `name` (or `EleutherAI/name`, as litgpt accepts the HF id too).
pub fn find(name: &str) -> Option<ModelConfig> {
    let short = name.strip_prefix("EleutherAI/").unwrap_or(name);
    all().into_iter().find(|c| c.name == short)
}

/// Names, for error messages and `--help`.
pub fn names() -> Vec<String> {
    all().into_iter().map(|c| c.name).collect()
}
