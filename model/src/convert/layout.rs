//! Where the conversion's tensors go to: the MLA tensors (`q_proj` or `q_a_proj`+`q_b_proj`,
//! `kv_a_proj_with_mqa`, `kv_b_proj`) assembled from the source's pieces (source.rs) as
//! factored (factor.rs, rorope.rs). `attn.proj` and every other tensor pass through
//! unchanged: the value heads keep the source's order.
//!
//! Notation as in mod.rs.

use super::factor::{Kv, LowRank};
use super::rorope::Rope;
use super::source::F64;
use super::Dims;
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// Write layer `layer`'s MLA tensors into `out` (fp32).
pub(crate) fn write(
    out: &mut HashMap<String, Tensor>,
    layer: usize,
    d: &Dims,
    rope: &Rope,
    kv: &Kv,
    q: Option<&LowRank>,
) {
    let prefix = format!("transformer.h.{layer}.attn");
    let mut put = |name: &str, t: Tensor| {
        out.insert(
            format!("{prefix}.{name}"),
            t.to_kind(Kind::Float).contiguous(),
        );
    };
    let weight = |aug: &Tensor| aug.narrow(1, 0, d.e);
    let bias = |aug: &Tensor| aug.select(1, d.e);
    match q {
        Some(q) => {
            put("q_a_proj.weight", q.down.shallow_clone());
            put("q_b_proj.weight", q.up.shallow_clone());
            if d.bias {
                put("q_a_proj.bias", Tensor::zeros([q.down.size()[0]], F64));
                put("q_b_proj.bias", bias(&rope.q));
            }
        }
        None => {
            put("q_proj.weight", weight(&rope.q));
            if d.bias {
                put("q_proj.bias", bias(&rope.q));
            }
        }
    }
    put(
        "kv_a_proj_with_mqa.weight",
        Tensor::cat(&[kv.down.shallow_clone(), weight(&rope.k_rope)], 0),
    );
    put("kv_b_proj.weight", kv.up.shallow_clone());
    if d.bias {
        // The latent needs no bias (the factorisations are of the weights alone); k_rope's is
        // the source keys' bias along each frequency's principal component.
        put(
            "kv_a_proj_with_mqa.bias",
            Tensor::cat(&[Tensor::zeros([d.c], F64), bias(&rope.k_rope)], 0),
        );
        put("kv_b_proj.bias", kv.up_bias.shallow_clone());
    }
}
