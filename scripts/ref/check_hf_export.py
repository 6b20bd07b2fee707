"""Python side of the Hugging Face export check: load a directory written by `mla export --to
hf` with `transformers` itself (`AutoModelForCausalLM.from_pretrained`, fp32, eager
attention), run it on fixed token ids and compare its logits and next-token loss with mla's
(`mla ckpt logits`). trainer/tests/interop.rs runs it.

    .venv/bin/python scripts/ref/check_hf_export.py EXPORT --tokens 1,2,3 --compare mla.json

Exits 1 when the logits differ by more than --tol; prints both losses either way.
"""

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM


def loss_of(logits: torch.Tensor, tokens: list[int]) -> float:
    """Mean next-token cross-entropy of (T, V) logits over tokens[1:]."""
    return F.cross_entropy(logits[:-1].double(), torch.tensor(tokens[1:])).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir")
    p.add_argument("--tokens", required=True, help="comma-separated token ids")
    p.add_argument("--compare", required=True, help="JSON of `mla ckpt logits`")
    p.add_argument("--tol", type=float, default=1e-5)
    a = p.parse_args()
    tokens = [int(t) for t in a.tokens.split(",")]
    model = AutoModelForCausalLM.from_pretrained(
        a.export_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        ours = model(torch.tensor([tokens])).logits[0].float()  # (T, V)
    with open(a.compare) as f:
        theirs = torch.tensor(json.load(f)["logits"], dtype=torch.float32)
    if theirs.shape != ours.shape:
        sys.exit(f"shape {tuple(theirs.shape)} in {a.compare}, transformers {tuple(ours.shape)}")
    diff = (theirs - ours).abs().max().item()
    print(f"architecture {type(model).__name__}")
    print(f"Δ logits, mla vs transformers, over {ours.numel()} logits: {diff:.2e} (bound {a.tol:.1e})")
    print(f"loss mla {loss_of(theirs, tokens):.8f} transformers {loss_of(ours, tokens):.8f}")
    sys.exit(0 if diff <= a.tol else 1)


if __name__ == "__main__":
    main()
