"""Tiny random models as litgpt and Hugging Face save them, for trainer/tests/interop.rs (issue 9:
models that enter mla). Each directory also gets the tokenizer files of --tokenizer-dir.

    .venv/bin/python scripts/ref/make_foreign_models.py OUT --tokenizer-dir D

writes, under OUT (each with tokenizer.json and pythia's tokenizer_config.json):
  lit/         lit_model.pth (torch.save of a litgpt GPT's state dict) + model_config.yaml
               (litgpt's save_config: every Config field)
  lit_fabric/  the same weights as litgpt's training checkpoints hold them: {"model": …, "iter_num": …}
  hf/          GPTNeoXForCausalLM.save_pretrained: config.json + model.safetensors
  hf_sharded/  the same, sharded: model.safetensors.index.json + model-0000N-of-0000M.safetensors
  hf_bin/      the same as pytorch_model.bin (safe_serialization=False)
  hf_llama/    LlamaForCausalLM.save_pretrained (GQA, tied embeddings: no lm_head.weight saved)
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from litgpt import GPT, Config
from litgpt.utils import save_config
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM


# EleutherAI/pythia-*'s tokenizer_config.json: bos = eos = <|endoftext|>, no add_bos_token, so
# litgpt does not prepend the bos to prompts (and stops at the eos).
PYTHIA_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "tokenizer_class": "GPTNeoXTokenizer",
}


def tokenizer_files(src: Path, dst: Path) -> None:
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    if (src / "tokenizer_config.json").is_file():
        shutil.copy(src / "tokenizer_config.json", dst / "tokenizer_config.json")
    else:
        (dst / "tokenizer_config.json").write_text(json.dumps(PYTHIA_TOKENIZER_CONFIG, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--tokenizer-dir", required=True)
    a = p.parse_args()
    out, tok = Path(a.out), Path(a.tokenizer_dir)
    torch.manual_seed(0)

    config = Config(
        name="tiny-pythia", block_size=32, n_layer=2, n_embd=32, n_head=4, n_query_groups=2,
        vocab_size=50254, padded_vocab_size=50304, rotary_percentage=0.25, parallel_residual=True,
        bias=True, norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", intermediate_size=128,
    )
    model = GPT(config)
    with torch.no_grad():
        for p_ in model.parameters():
            p_.normal_(0, 0.5)  # far from LayerNorm's ones and zeros
    for name, payload in (("lit", model.state_dict()), ("lit_fabric", {"model": model.state_dict(), "iter_num": 3})):
        d = out / name
        d.mkdir(parents=True)
        torch.save(payload, d / "lit_model.pth")
        save_config(config, d)
        tokenizer_files(tok, d)

    hf_config = GPTNeoXConfig(
        vocab_size=50304, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, rotary_pct=0.25, max_position_embeddings=32, attention_bias=True,
        use_parallel_residual=True, tie_word_embeddings=False,
    )
    hf = GPTNeoXForCausalLM(hf_config)
    with torch.no_grad():
        for p_ in hf.parameters():
            p_.normal_(0, 0.5)
    for name, kwargs in (
        ("hf", {}),
        ("hf_sharded", {"max_shard_size": "5MB"}),
        ("hf_bin", {"safe_serialization": False}),
    ):
        d = out / name
        hf.save_pretrained(d, **kwargs)
        tokenizer_files(tok, d)

    llama_config = LlamaConfig(
        vocab_size=50304, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
    )
    llama = LlamaForCausalLM(llama_config)
    with torch.no_grad():
        for p_ in llama.parameters():
            p_.normal_(0, 0.5)
    d = out / "hf_llama"
    llama.save_pretrained(d)
    tokenizer_files(tok, d)
    print(f"wrote {', '.join(sorted(x.name for x in out.iterdir()))} under {out}")


if __name__ == "__main__":
    main()
