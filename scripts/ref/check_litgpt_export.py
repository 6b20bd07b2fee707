"""Python side of the litgpt interop checks: load a litgpt directory (written by `mla export --to
litgpt`, or by litgpt itself) with litgpt 0.5.13 (`Config.from_file(model_config.yaml)`, `GPT`,
`torch.load` of lit_model.pth with weights_only and mmap, `load_state_dict(strict=True)`), run it
on fixed token ids and compare its logits and next-token loss with mla's (`mla ckpt logits`).
trainer/tests/interop.rs runs it. Unless --no-tokenizer-check, it also checks litgpt's tokenizer
on that directory (bos = eos = the separator, prepended to prompts), as `mla export` sets it.

    .venv/bin/python scripts/ref/check_litgpt_export.py EXPORT --tokens 1,2,3 --compare mla.json

Exits 1 when the logits differ by more than --tol; prints both losses either way.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from litgpt import GPT, Config, Tokenizer


def loss_of(logits: torch.Tensor, tokens: list[int]) -> float:
    """Mean next-token cross-entropy of (T, V) logits over tokens[1:]."""
    return F.cross_entropy(logits[:-1].double(), torch.tensor(tokens[1:])).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir")
    p.add_argument("--tokens", required=True, help="comma-separated token ids")
    p.add_argument("--compare", required=True, help="JSON of `mla ckpt logits`")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument(
        "--no-tokenizer-check",
        action="store_true",
        help="a directory litgpt wrote itself: no bos/eos convention to check",
    )
    a = p.parse_args()
    d = Path(a.export_dir)
    tokens = [int(t) for t in a.tokens.split(",")]

    config = Config.from_file(d / "model_config.yaml")
    model = GPT(config)
    state = torch.load(d / "lit_model.pth", weights_only=True, mmap=True)
    state = state.get("model", state)  # litgpt's training checkpoints nest the weights
    model.load_state_dict(state, strict=True)  # every key and shape, nothing left over
    model.eval()
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0].float()  # (T, V)
    with open(a.compare) as f:
        theirs = torch.tensor(json.load(f)["logits"], dtype=torch.float32)
    if theirs.shape != ours.shape:
        sys.exit(f"shape {tuple(theirs.shape)} in {a.compare}, litgpt {tuple(ours.shape)}")

    if not a.no_tokenizer_check:
        tok = Tokenizer(d)
        sep = tok.bos_id
        if sep is None or tok.eos_id != sep or not tok.use_bos:
            sys.exit(f"tokenizer: bos {tok.bos_id}, eos {tok.eos_id}, use_bos {tok.use_bos}")
        encoded = tok.encode("Once upon a time").tolist()
        if encoded[0] != sep:
            sys.exit(f"tokenizer: prompts do not start with the separator {sep}: {encoded}")
        print(f"separator {sep}")

    diff = (theirs - ours).abs().max().item()
    print(f"Δ logits, mla vs litgpt, over {ours.numel()} logits: {diff:.2e} (bound {a.tol:.1e})")
    print(f"loss mla {loss_of(theirs, tokens):.8f} litgpt {loss_of(ours, tokens):.8f}")
    sys.exit(0 if diff <= a.tol else 1)


if __name__ == "__main__":
    main()
