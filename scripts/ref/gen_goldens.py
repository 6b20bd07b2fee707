"""Generate the parity goldens of model/tests/parity.rs.

For tiny MHA, GQA, MQA and MLA-mapping configs the peer is litgpt 0.5.13 itself
(`litgpt.model.GPT`); for the seed's `latent_attention: true` variant, which litgpt cannot
express, it is the plain-PyTorch reference scripts/ref/gpt_ref.py — first checked against
litgpt on every config litgpt can express (same weights → same logits and gradients).

Each golden `model/tests/goldens/<name>.safetensors` holds fp32 weights `w.<litgpt key>`,
input `idx`, `targets`, `logits`, `loss` (mean cross-entropy) and gradients `g.<litgpt key>`;
`<name>.json` holds the model_config (litgpt YAML keys). Run through scripts/ref/regen_goldens.sh.
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import gpt_ref  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "model" / "tests" / "goldens"
NOISE_STD = 0.15
B, T = 2, 12

BASE = dict(
    block_size=16, n_layer=2, n_embd=32, n_head=4, vocab_size=30, padding_multiple=32,
    rotary_percentage=0.5, intermediate_size=48,
)
LITGPT_CONFIGS = {
    # GptNeoX (pythia) style: LayerNorm, parallel residual, GELU MLP, biases.
    "mha": dict(BASE, n_query_groups=4),
    # LLaMA-style switches: RMSNorm, sequential residual, SwiGLU MLP, no bias.
    "gqa": dict(BASE, n_query_groups=2, norm_class_name="RMSNorm", parallel_residual=False,
                mlp_class_name="LLaMAMLP", bias=False),
    # Per-head q/k norms and tanh GELU.
    "mqa": dict(BASE, n_query_groups=1, norm_qk=True, gelu_approximate="tanh"),
    # MLA with DeepSeek names (litgpt semantics: RMSNorm latents, biases on q_b/kv_b/proj).
    "mla_mapping": dict(BASE, latent_attention=dict(
        q_lora_rank=16, kv_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=10)),
}
SEED_CONFIGS = {
    # The seed's latent_attention: true (24 wide so that 2·n_embd/3 is whole), without and
    # with latent norms (norm_qk).
    "mla_seed": dict(BASE, n_embd=24, n_head=2, latent_attention=True),
    "mla_seed_norm_qk": dict(BASE, n_embd=24, n_head=2, latent_attention=True, norm_qk=True, bias=False),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter ~ N(0, NOISE_STD²) (norm weights around 1), in name order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * NOISE_STD + base)


def run(model, idx, targets):
    model.zero_grad(set_to_none=True)
    logits = model(idx)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def inputs(vocab_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab_size, (B, T), generator=g)
    targets = torch.randint(0, vocab_size, (B, T), generator=g)
    return idx, targets


def litgpt_model(cfg: dict):
    from litgpt.config import Config
    from litgpt.model import GPT

    return GPT(Config(**cfg))


def max_diff(a, b):
    return (a - b).abs().max().item()


def write(name: str, cfg: dict, model, idx, targets, logits, loss, grads):
    tensors = {f"w.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"g.{k}": v.contiguous() for k, v in grads.items()})
    tensors.update(idx=idx, targets=targets, logits=logits.contiguous(), loss=loss.reshape(1))
    save_file(tensors, OUT / f"{name}.safetensors")
    (OUT / f"{name}.json").write_text(json.dumps(dict(model_config=cfg), indent=2, sort_keys=True) + "\n")


def main():
    torch.use_deterministic_algorithms(True)
    OUT.mkdir(parents=True, exist_ok=True)
    for i, (name, cfg) in enumerate({**LITGPT_CONFIGS, **SEED_CONFIGS}.items()):
        idx, targets = inputs(cfg["vocab_size"], 100 + i)
        ref = gpt_ref.GPT(gpt_ref.Cfg(**cfg))
        randomize(ref, 1000 + i)
        ref_out = run(ref, idx, targets)
        if name in LITGPT_CONFIGS:
            peer = litgpt_model(cfg)
            missing = peer.load_state_dict(ref.state_dict(), strict=True)
            assert not missing.missing_keys and not missing.unexpected_keys, missing
            logits, loss, grads = run(peer, idx, targets)
            d_logits = max_diff(logits, ref_out[0])
            d_grads = max(max_diff(grads[k], ref_out[2][k]) for k in grads)
            print(f"{name}: gpt_ref vs litgpt 0.5.13: logits {d_logits:.2e}, grads {d_grads:.2e}")
            # The same fp32 forward and backward by two implementations: rounding only
            # (model/tests/common.rs FORWARD_TOL derives 1e-5 for these tiny models).
            assert d_logits < 1e-5 and d_grads < 1e-5, "gpt_ref disagrees with litgpt"
            source = "litgpt 0.5.13"
        else:
            peer, (logits, loss, grads) = ref, ref_out
            source = "gpt_ref.py"
        write(name, cfg, peer, idx, targets, logits, loss, grads)
        n_params = sum(p.numel() for p in peer.parameters())
        print(f"{name}: {source}, {n_params} parameters, loss {loss.item():.6f}")
    total = sum(f.stat().st_size for f in OUT.iterdir())
    print(f"goldens: {total / 1024:.0f} KiB in {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
