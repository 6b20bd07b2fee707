"""Plain-PyTorch training loop: the baseline of scripts/bench/train_throughput.sh.

Same model (gpt_ref.GPT, litgpt architecture), same config file, same prepared token shards,
same step (micro-batches with gradient accumulation, cross-entropy in fp32, global-norm clipping,
AdamW with decoupled decay on ≥2-D weights, warmup + cosine), bf16 autocast on CUDA. torch's
AdamW gets its fastest implementation (fused where supported). Prints one JSON object:
{"tokens_per_sec": …, "steps": …, "loss": …}. Not a trainer: no checkpoints, no eval.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import gpt_ref  # noqa: E402


def load_tokens(data_dir: Path) -> np.ndarray:
    index = json.loads((data_dir / "index.json").read_text())
    dtype = {"u16": np.uint16, "u32": np.uint32}[index["dtype"]]
    parts = [np.memmap(data_dir / s["file"], dtype=dtype, mode="r", offset=32) for s in index["splits"]["train"]["shards"]]
    return np.concatenate(parts).astype(np.int64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--data", required=True, help="prepared dataset directory (mla prepare)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="steps excluded from the timing")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    cfg = yaml.safe_load(Path(args.config).read_text())
    mc = dict(cfg["model_config"])
    mc.pop("name", None)
    model_cfg = gpt_ref.Cfg(**mc)
    t, o = cfg["train"], cfg["optimizer"]["init_args"]
    micro, T = t["micro_batch_size"], model_cfg.block_size
    accum = t["global_batch_size"] // micro
    device = torch.device(args.device)
    autocast = device.type == "cuda" and cfg.get("precision", "bf16-mixed") == "bf16-mixed"
    torch.manual_seed(cfg.get("seed", 42))

    tokens = load_tokens(Path(args.data))
    n_windows = len(tokens) // (T + 1)
    windows = torch.from_numpy(tokens[: n_windows * (T + 1)].reshape(n_windows, T + 1))
    order = torch.randperm(n_windows)

    model = gpt_ref.GPT(model_cfg).to(device)
    model.init_weights_litgpt()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        opt = torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]))
    warmup_steps, total = t.get("lr_warmup_steps") or 0, args.steps

    def lr_at(step):
        if step < warmup_steps:
            return o["lr"] * (step + 1) / warmup_steps
        ratio = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        return t["min_lr"] + 0.5 * (1 + math.cos(math.pi * ratio)) * (o["lr"] - t["min_lr"])

    cursor, timed_tokens, timed_secs, loss_val = 0, 0, 0.0, float("nan")
    for step in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss_sum = 0.0
        for _ in range(accum):
            batch = windows[order[cursor : cursor + micro]].to(device, non_blocking=True)
            cursor = (cursor + micro) % (n_windows - micro)
            x, y = batch[:, :T], batch[:, 1:]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(x)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
            (loss / accum).backward()
            loss_sum += loss.detach()
        if t.get("max_norm"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), t["max_norm"])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_val = float(loss_sum) / accum  # host sync, as mla's per-step loss read
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            timed_secs += time.perf_counter() - start
            timed_tokens += micro * accum * T
    print(json.dumps({"tokens_per_sec": timed_tokens / timed_secs, "steps": args.steps, "loss": loss_val}))


if __name__ == "__main__":
    main()
