"""Seed inputs for mla's fuzz targets (scripts/fuzz.sh), written by the real writers: torch.save
archives of state dicts as torch and litgpt write them, and safetensors files as the
`safetensors` package writes them. Files mla itself writes (checkpoints, manifests, datasets,
exports) are added by scripts/fuzz.sh from a tiny run of the mla binary.

Usage: python scripts/fuzz/seeds.py OUT   (OUT/<target>/<name> for each seed)
"""

import io
import struct
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import save as st_save


def state_dicts():
    """Small state dicts that cover what readers meet: dtypes, views, ties, nesting."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, generator=g)
    yield "plain", OrderedDict(weight=torch.randn(3, 4, generator=g), bias=torch.zeros(3))
    yield "tied", OrderedDict(wte=w, lm_head=w)
    yield "transposed", OrderedDict(w=w, wt=w.t())
    yield "sliced", OrderedDict(w=w, row=w[1], col=w[:, 2])
    yield "dtypes", OrderedDict(
        f16=torch.ones(2, dtype=torch.float16),
        bf16=torch.ones(2, dtype=torch.bfloat16),
        f64=torch.ones(2, dtype=torch.float64),
        i64=torch.arange(3),
        i32=torch.arange(3, dtype=torch.int32),
        u8=torch.arange(3, dtype=torch.uint8),
        b=torch.tensor([True, False]),
    )
    yield "scalar_empty", OrderedDict(s=torch.tensor(1.5), e=torch.zeros(0, 5))
    yield "training_checkpoint", {"model": OrderedDict(w=w), "iter_num": 3, "optimizer": {"lr": 0.1}}
    yield "parameters", OrderedDict(p=torch.nn.Parameter(torch.ones(2, 2)))


def pickle_seed(sd) -> bytes:
    """`[len u16][data.pkl][record 0]` of fuzz_torch_pickle, for a state dict whose storages
    are keyed 0, 1 (16 bytes) and 2 (64 bytes), as its harness provides them."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        names = z.namelist()
        pkl = z.read(next(n for n in names if n.endswith("data.pkl")))
        record = z.read(next(n for n in names if n.endswith("data/0")))
    return struct.pack("<H", len(pkl)) + pkl + record


def main(out: Path) -> None:
    dirs = {t: out / t for t in ("torch_save", "torch_pickle", "safetensors")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for name, sd in state_dicts():
        torch.save(sd, dirs["torch_save"] / f"{name}.pth")
        flat = sd.get("model", sd) if isinstance(sd, dict) else sd
        tensors = {k: v.detach().contiguous().clone() for k, v in flat.items()}
        (dirs["safetensors"] / f"{name}.safetensors").write_bytes(
            st_save(tensors, metadata={"format": "pt"})
        )
    g = torch.Generator().manual_seed(1)
    harness = [
        ("three", OrderedDict(a=torch.randn(5, generator=g), b=torch.ones(4), c=torch.ones(16))),
        ("views", OrderedDict(a=torch.randn(2, 3, generator=g).t(), b=torch.ones(4), c=torch.ones(4, 4)[1:])),
        ("nested", {"model": OrderedDict(a=torch.ones(3), b=torch.ones(4), c=torch.ones(16)), "step": 7}),
    ]
    for name, sd in harness:
        (dirs["torch_pickle"] / name).write_bytes(pickle_seed(sd))
    print(f"seeds.py: wrote {sum(len(list(d.iterdir())) for d in dirs.values())} seeds under {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
