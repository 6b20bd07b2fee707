"""What the scripts/ref logit checkers share: their command line (a model directory, --tokens,
--compare with the JSON of `mla ckpt logits`, --tol) and the comparison they print, the max |Δ|
of the logits and both next-token losses, exiting 1 past the bound."""

import argparse
import json
import sys

import torch
import torch.nn.functional as F


def parser(doc: str, tol: float, compare_required: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--tokens", required=True, type=lambda s: [int(t) for t in s.split(",")],
                   help="comma-separated token ids")
    p.add_argument("--compare", required=compare_required, help="JSON of `mla ckpt logits`")
    p.add_argument("--tol", type=float, default=tol)
    return p


def loss_of(logits: torch.Tensor, tokens: list[int]) -> float:
    """Mean next-token cross-entropy of (T, V) logits over tokens[1:]."""
    return F.cross_entropy(logits[:-1].double(), torch.tensor(tokens[1:])).item()


def compare_and_exit(who: str, ours: torch.Tensor, a: argparse.Namespace) -> None:
    """Compare `ours` (T, V) with mla's logits in a.compare: print the max |Δ| and both
    losses, exit 0 within a.tol, else 1."""
    with open(a.compare) as f:
        mla = torch.tensor(json.load(f)["logits"], dtype=torch.float32)
    if mla.shape != ours.shape:
        sys.exit(f"shape {tuple(mla.shape)} in {a.compare}, {who} {tuple(ours.shape)}")
    diff = (mla - ours).abs().max().item()
    print(f"Δ logits, mla vs {who}, over {ours.numel()} logits: {diff:.2e} (bound {a.tol:.1e})")
    print(f"loss mla {loss_of(mla, a.tokens):.8f} {who} {loss_of(ours, a.tokens):.8f}")
    sys.exit(0 if diff <= a.tol else 1)
