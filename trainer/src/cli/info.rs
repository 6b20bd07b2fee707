//! `mla info --config F [--json]`: what a config builds — parameters, training FLOPs per
//! token, inference-cache bytes per token, SDPA head dims, the training memory `mla train`
//! checks before it starts — without allocating the model.

use crate::config::{Override, Precision, RunConfig};
use crate::metrics::thousands;
use mla_model::{stats, AttentionKind};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Run config (litgpt pretrain YAML).
    #[arg(long)]
    config: PathBuf,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &InfoArgs, overrides: &[Override]) -> anyhow::Result<()> {
    let cfg = RunConfig::load(&args.config, overrides)?;
    let m = cfg.model();
    let parameters = stats::parameters(m) as u64;
    let embedding = (m.padded_vocab_size() * m.n_embd) as u64;
    let flops = stats::flops_per_token(m);
    let values = stats::kv_cache_values_per_token(m) as u64;
    // Without `precision:` training uses bf16-mixed on CUDA (32-true on CPU); caches follow
    // the activation dtype.
    let precision = cfg.precision.unwrap_or(Precision::Bf16Mixed);
    let kv_bf16 = values * 2;
    let kv_precision = values * precision.activation_bytes() as u64;
    let (dqk, dv) = m.sdpa_head_dims();
    let absorbed = stats::absorbed_head_dims(m);
    let kind = m.attention_kind();
    let formula = "6*N + 6*n_layer*n_head*block_size*(d_qk + d_v), N = parameters without the input embedding (PaLM appendix B, no causal halving)";
    // What `mla train` checks against the device before it builds the model.
    let (param_kind, autocast) = match precision {
        Precision::Fp32 => (tch::Kind::Float, false),
        Precision::Bf16Mixed => (tch::Kind::Float, true),
        Precision::Bf16True => (tch::Kind::BFloat16, false),
    };
    // Per rank of the ranks the config asks for (devices × num_nodes).
    let world = match cfg.devices {
        crate::config::Devices::Count(d) => d * cfg.num_nodes,
        crate::config::Devices::Auto => 1,
    };
    let memory = crate::train::memory::estimate(
        cfg.model(),
        &cfg.train,
        &cfg.dist,
        param_kind,
        autocast,
        world,
    );
    if args.json {
        let obj = serde_json::json!({
            "model": m.name,
            "attention": kind.name(),
            "parameters": parameters,
            "non_embedding_parameters": parameters - embedding,
            "flops_per_token": flops,
            "flops_formula": formula,
            "block_size": m.block_size,
            "kv_cache_values_per_token": values,
            "kv_cache_bytes_per_token_bf16": kv_bf16,
            "kv_cache_bytes_per_token": kv_precision,
            "precision": precision.as_str(),
            "sdpa_head_dims": {"qk": dqk, "v": dv},
            "absorbed_sdpa_head_dims": absorbed.map(|(qk, v)| serde_json::json!({"qk": qk, "v": v})),
            "training_memory_bytes_at_least": {
                "total": memory.total(),
                "weights": memory.weights,
                "gradients": memory.gradients,
                "optimizer": memory.optimizer,
                "activations": memory.activations,
                "logits": memory.logits,
            },
        });
        println!("{obj}");
        return Ok(());
    }
    let attention = match kind {
        AttentionKind::Mla(s) => format!(
            "MLA (q_lora_rank {}, kv_lora_rank {}, rope {}, nope {}, v {})",
            s.q_lora_rank.map_or("none".into(), |r| r.to_string()),
            s.kv_lora_rank,
            s.qk_rope_head_dim,
            s.qk_nope_head_dim,
            s.v_head_dim
        ),
        AttentionKind::Gqa { n_query_groups } => format!("GQA ({n_query_groups} query groups)"),
        k => k.name().to_string(),
    };
    println!(
        "model         {} — {} layers, {} wide, {} heads, {attention}",
        m.name, m.n_layer, m.n_embd, m.n_head
    );
    println!(
        "parameters    {} ({} without the input embedding)",
        thousands(parameters),
        thousands(parameters - embedding)
    );
    println!(
        "FLOPs/token   {:.3e} (training, T = {}; {formula})",
        flops, m.block_size
    );
    println!(
        "KV cache      {} B/token at bf16, {} B/token at {} ({} values per token over {} layers)",
        thousands(kv_bf16),
        thousands(kv_precision),
        precision.as_str(),
        thousands(values),
        m.n_layer
    );
    match absorbed {
        Some((qk, v)) => {
            println!("SDPA dims     training q/k {dqk}, v {dv}; absorbed decode q/k {qk}, v {v}")
        }
        None => println!("SDPA dims     q/k {dqk}, v {dv}"),
    }
    println!(
        "memory        at least {} per rank to train at micro batch {} × {} tokens, {}",
        memory.describe(),
        cfg.train.micro_batch_size,
        cfg.train.max_seq_length.unwrap_or(m.block_size),
        precision.as_str()
    );
    Ok(())
}
