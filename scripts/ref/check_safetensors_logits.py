"""Python side of the checkpoint parity check: load an mla checkpoint's model.safetensors with
`safetensors.torch.load_file` into the plain-PyTorch reference GPT (scripts/ref/gpt_ref.py,
built from the step's config.yaml `model_config`), run it on fixed token ids and print the
logits as JSON. `mla ckpt logits <step_dir> --tokens …` is the Rust side;
trainer/tests/ckpt_local.rs compares the two (max |Δ| < 1e-4).

What it is not: a general checkpoint loader (local step directories only, fp32 on CPU, the
model_config fields gpt_ref implements).

    .venv/bin/python scripts/ref/check_safetensors_logits.py out/pretrain/debug/final --tokens 1,2,3
    .venv/bin/python scripts/ref/check_safetensors_logits.py STEP --tokens 1,2,3 --compare mla.json

With --compare (the JSON printed by `mla ckpt logits`) it prints the max |Δ| instead and exits 1
when it exceeds --tol.
"""

import dataclasses
import json
import os
import sys

import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpt_ref  # noqa: E402
from logits_compare import compare_and_exit, parser  # noqa: E402

# model_config fields gpt_ref does not implement, with the value that makes them no-ops.
NEUTRAL = {"attention_scores_scalar": None, "rope_condense_ratio": 1, "scale_embeddings": False, "lm_head_bias": False}


def reference_model(step_dir: str) -> gpt_ref.GPT:
    with open(os.path.join(step_dir, "config.yaml")) as f:
        model_config = yaml.safe_load(f)["model_config"]
    known = {f.name for f in dataclasses.fields(gpt_ref.Cfg)}
    for key, value in model_config.items():
        if key not in known and NEUTRAL.get(key, object()) != value:
            sys.exit(f"{step_dir}/config.yaml: model_config.{key} = {value!r} is not implemented by gpt_ref")
    cfg = gpt_ref.Cfg(**{k: v for k, v in model_config.items() if k in known})
    model = gpt_ref.GPT(cfg)
    state = load_file(os.path.join(step_dir, "model.safetensors"))
    model.load_state_dict(state, strict=True)  # every key, every shape: a litgpt state dict
    return model.eval()


def main() -> None:
    a = parser(__doc__, tol=1e-4, compare_required=False).parse_args()
    model = reference_model(a.model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([a.tokens]))[0].float()  # (T, V)
    if a.compare is None:
        print(json.dumps({"tokens": a.tokens, "logits": logits.tolist()}))
        return
    compare_and_exit("gpt_ref", logits, a)


if __name__ == "__main__":
    main()
