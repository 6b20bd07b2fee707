"""Python side of the Hugging Face export check: load a directory written by `mla export --to
hf` with `transformers` itself (`AutoModelForCausalLM.from_pretrained`, fp32, eager
attention), run it on fixed token ids and compare its logits and next-token loss with mla's
(`mla ckpt logits`). trainer/tests/interop.rs runs it.

    .venv/bin/python scripts/ref/check_hf_export.py EXPORT --tokens 1,2,3 --compare mla.json

Exits 1 when the logits differ by more than --tol; prints both losses either way.
"""

import os
import sys

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from logits_compare import compare_and_exit, parser  # noqa: E402


def main() -> None:
    a = parser(__doc__, tol=1e-5).parse_args()
    model = AutoModelForCausalLM.from_pretrained(
        a.model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        ours = model(torch.tensor([a.tokens])).logits[0].float()  # (T, V)
    print(f"architecture {type(model).__name__}")
    compare_and_exit("transformers", ours, a)


if __name__ == "__main__":
    main()
