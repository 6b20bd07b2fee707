"""Plain-PyTorch reference GPT for mla: the parity peer for the seed's `latent_attention: true`
variant (which litgpt 0.5.13 cannot express) and the baseline of scripts/bench/.

What it is: one file, no litgpt import, the same architecture switches and state-dict keys as
litgpt 0.5.13 (`transformer.h.0.attn.qkv.weight`, …) for MHA/GQA/MQA, MLA with the
DeepSeek-named mapping (litgpt semantics), and the seed's MLA (`latent_attention: true`:
q_lora = n_embd/2, kv_lora = 2·n_embd/3, rope = nope = head_size/2, v = head_size, no bias in any
MLA linear, latent norms of `norm_class_name` only when `norm_qk`).
What it is not: a trainer. scripts/ref/gen_goldens.py checks it against litgpt itself on every
config litgpt can express before trusting it for the seed variant.

Notation: B batch, T time, C n_embd, H heads, G query groups, hs head size.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass
class Cfg:
    """The litgpt Config fields this reference implements (litgpt names and defaults)."""

    name: str = ""
    block_size: int = 4096
    n_layer: int = 16
    n_embd: int = 4096
    vocab_size: int = 50254
    padding_multiple: int = 512
    padded_vocab_size: int | None = None
    norm_class_name: str = "LayerNorm"
    norm_eps: float = 1e-5
    norm_qk: bool = False
    parallel_residual: bool = True
    shared_attention_norm: bool = False
    n_head: int = 32
    head_size: int | None = None
    n_query_groups: int | None = None
    attn_bias: bool = False
    rope_base: int = 10000
    rotary_percentage: float = 0.25
    intermediate_size: int | None = None
    bias: bool = True
    mlp_class_name: str = "GptNeoxMLP"
    gelu_approximate: str = "none"
    latent_attention: bool | dict | None = None
    hf_config: dict = field(default_factory=dict)

    def __post_init__(self):
        self.head_size = self.head_size or self.n_embd // self.n_head
        self.padded_vocab_size = self.padded_vocab_size or find_multiple(self.vocab_size, self.padding_multiple)
        self.n_query_groups = self.n_query_groups or self.n_head
        self.intermediate_size = self.intermediate_size or 4 * self.n_embd
        self.rope_n_elem = int(self.rotary_percentage * self.head_size)
        la = self.latent_attention
        self.mla = None
        if la is True:  # the seed's shorthand
            hs = self.head_size
            self.mla = dict(
                q_lora_rank=self.n_embd // 2, kv_lora_rank=2 * self.n_embd // 3,
                qk_rope_head_dim=hs // 2, qk_nope_head_dim=hs // 2, v_head_dim=hs,
                down_bias=False, up_bias=False, latent_norm=self.norm_class_name if self.norm_qk else None,
            )
        elif isinstance(la, dict):  # DeepSeek names, litgpt 0.5.13 semantics
            self.mla = dict(la, down_bias=self.attn_bias, up_bias=self.bias, latent_norm="RMSNorm")
        if self.mla:
            self.rope_n_elem = self.mla["qk_rope_head_dim"]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


def make_norm(kind: str, size: int, eps: float) -> nn.Module:
    return nn.LayerNorm(size, eps=eps) if kind == "LayerNorm" else RMSNorm(size, eps)


def rope_cache(seq_len: int, n_elem: int, base: int, device=None):
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, device=device).float() / n_elem))
    angles = torch.outer(torch.arange(seq_len, device=device).float(), theta).repeat(1, 2)
    return torch.cos(angles), torch.sin(angles)  # (T, n_elem) each


def apply_rope(x, cos, sin):
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """MHA / GQA / MQA with litgpt's fused qkv layout [q | k | v]."""

    def __init__(self, c: Cfg):
        super().__init__()
        self.c = c
        self.qkv = nn.Linear(c.n_embd, (c.n_head + 2 * c.n_query_groups) * c.head_size, bias=c.bias or c.attn_bias)
        self.proj = nn.Linear(c.n_head * c.head_size, c.n_embd, bias=c.bias)
        if c.norm_qk:
            self.norm_q = make_norm(c.norm_class_name, c.head_size, c.norm_eps)
            self.norm_k = make_norm(c.norm_class_name, c.head_size, c.norm_eps)

    def forward(self, x, cos, sin):
        c = self.c
        B, T, _ = x.shape
        H, G, hs, n = c.n_head, c.n_query_groups, c.head_size, c.rope_n_elem
        q, k, v = self.qkv(x).split((H * hs, G * hs, G * hs), dim=-1)
        q = q.view(B, T, H, hs).transpose(1, 2)  # (B, H, T, hs)
        k = k.view(B, T, G, hs).transpose(1, 2)  # (B, G, T, hs)
        v = v.view(B, T, G, hs).transpose(1, 2)  # (B, G, T, hs)
        if c.norm_qk:
            q, k = self.norm_q(q), self.norm_k(k)
        q = torch.cat((apply_rope(q[..., :n], cos, sin), q[..., n:]), dim=-1)
        k = torch.cat((apply_rope(k[..., :n], cos, sin), k[..., n:]), dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(hs), enable_gqa=G != H)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * hs))


class LatentAttention(nn.Module):
    """MLA (DeepSeek-V2): low-rank q, compressed kv latent, decoupled RoPE on one shared key head."""

    def __init__(self, c: Cfg):
        super().__init__()
        self.c, m = c, c.mla
        self.m = m
        H, dqk = c.n_head, m["qk_nope_head_dim"] + m["qk_rope_head_dim"]
        if m["q_lora_rank"]:
            self.q_a_proj = nn.Linear(c.n_embd, m["q_lora_rank"], bias=m["down_bias"])
            if m["latent_norm"]:
                self.q_a_norm = make_norm(m["latent_norm"], m["q_lora_rank"], c.norm_eps)
            self.q_b_proj = nn.Linear(m["q_lora_rank"], H * dqk, bias=m["up_bias"])
        else:
            self.q_proj = nn.Linear(c.n_embd, H * dqk, bias=m["up_bias"])
        self.kv_a_proj_with_mqa = nn.Linear(c.n_embd, m["kv_lora_rank"] + m["qk_rope_head_dim"], bias=m["down_bias"])
        if m["latent_norm"]:
            self.kv_a_norm = make_norm(m["latent_norm"], m["kv_lora_rank"], c.norm_eps)
        self.kv_b_proj = nn.Linear(m["kv_lora_rank"], H * (m["qk_nope_head_dim"] + m["v_head_dim"]), bias=m["up_bias"])
        self.proj = nn.Linear(H * m["v_head_dim"], c.n_embd, bias=m["up_bias"])

    def forward(self, x, cos, sin):
        c, m = self.c, self.m
        B, T, _ = x.shape
        H, Dn, Dr, Dv, C = c.n_head, m["qk_nope_head_dim"], m["qk_rope_head_dim"], m["v_head_dim"], m["kv_lora_rank"]
        if m["q_lora_rank"]:
            c_q = self.q_a_proj(x)
            if m["latent_norm"]:
                c_q = self.q_a_norm(c_q)
            q = self.q_b_proj(c_q)
        else:
            q = self.q_proj(x)
        q = q.view(B, T, H, Dn + Dr).transpose(1, 2)  # (B, H, T, Dn+Dr)
        q_nope, q_rope = q.split((Dn, Dr), dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split((C, Dr), dim=-1)
        if m["latent_norm"]:
            c_kv = self.kv_a_norm(c_kv)
        kv = self.kv_b_proj(c_kv).view(B, T, H, Dn + Dv).transpose(1, 2)  # (B, H, T, Dn+Dv)
        k_nope, v = kv.split((Dn, Dv), dim=-1)
        k_rope = apply_rope(k_rope.view(B, 1, T, Dr), cos, sin).expand(B, H, T, Dr)
        q = torch.cat((q_nope, apply_rope(q_rope, cos, sin)), dim=-1)
        k = torch.cat((k_nope, k_rope), dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(Dn + Dr))
        return self.proj(y.transpose(1, 2).reshape(B, T, H * Dv))


class MLP(nn.Module):
    def __init__(self, c: Cfg):
        super().__init__()
        self.c = c
        if c.mlp_class_name == "GptNeoxMLP":
            self.fc = nn.Linear(c.n_embd, c.intermediate_size, bias=c.bias)
        else:
            self.fc_1 = nn.Linear(c.n_embd, c.intermediate_size, bias=c.bias)
            self.fc_2 = nn.Linear(c.n_embd, c.intermediate_size, bias=c.bias)
        self.proj = nn.Linear(c.intermediate_size, c.n_embd, bias=c.bias)

    def forward(self, x):
        if self.c.mlp_class_name == "GptNeoxMLP":
            return self.proj(F.gelu(self.fc(x), approximate=self.c.gelu_approximate))
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


class Block(nn.Module):
    def __init__(self, c: Cfg):
        super().__init__()
        self.c = c
        self.norm_1 = make_norm(c.norm_class_name, c.n_embd, c.norm_eps)
        self.attn = LatentAttention(c) if c.mla else Attention(c)
        if not c.shared_attention_norm:
            self.norm_2 = make_norm(c.norm_class_name, c.n_embd, c.norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin):
        x_normed = self.norm_1(x)
        a = self.attn(x_normed, cos, sin)
        if self.c.parallel_residual:
            m_in = x_normed if self.c.shared_attention_norm else self.norm_2(x)
            return self.mlp(m_in) + (a + x)
        x = a + x
        return self.mlp(self.norm_2(x)) + x


class GPT(nn.Module):
    def __init__(self, c: Cfg):
        super().__init__()
        self.c = c
        self.lm_head = nn.Linear(c.n_embd, c.padded_vocab_size, bias=False)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(c.padded_vocab_size, c.n_embd),
                h=nn.ModuleList(Block(c) for _ in range(c.n_layer)),
                ln_f=make_norm(c.norm_class_name, c.n_embd, c.norm_eps),
            )
        )
        cos, sin = rope_cache(c.block_size, c.rope_n_elem, c.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, idx):
        T = idx.size(1)
        cos, sin = self.cos[:T], self.sin[:T]
        x = self.transformer.wte(idx)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cos, sin)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, V)

    def init_weights_litgpt(self):
        """litgpt pretrain's initialize_weights: N(0, sqrt(2/5C)) for Linear/Embedding weights,
        N(0, 1/sqrt(C)/n_layer) for the standard attention's output projection (and LLaMA MLP's),
        zero biases, unit norms."""
        std = math.sqrt(2.0 / 5 / self.c.n_embd)
        small = 1 / math.sqrt(self.c.n_embd) / self.c.n_layer
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, 0.0, std)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
        for mod in self.modules():
            if isinstance(mod, Attention) or (isinstance(mod, MLP) and mod.c.mlp_class_name == "LLaMAMLP"):
                nn.init.normal_(mod.proj.weight, 0.0, small)
