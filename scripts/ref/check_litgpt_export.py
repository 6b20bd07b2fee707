"""Python side of the litgpt interop checks: load a litgpt directory (written by `mla export --to
litgpt`, or by litgpt itself) with litgpt 0.5.13 (`Config.from_file(model_config.yaml)`, `GPT`,
`torch.load` of lit_model.pth with weights_only and mmap, `load_state_dict(strict=True)`), run it
on fixed token ids and compare its logits and next-token loss with mla's (`mla ckpt logits`).
trainer/tests/interop.rs runs it. Unless --no-tokenizer-check, it also checks litgpt's tokenizer
on that directory (bos = eos = the separator, prepended to prompts), as `mla export` sets it.

    .venv/bin/python scripts/ref/check_litgpt_export.py EXPORT --tokens 1,2,3 --compare mla.json

Exits 1 when the logits differ by more than --tol; prints both losses either way.
"""

import os
import sys
from pathlib import Path

import torch
from litgpt import GPT, Config, Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from logits_compare import compare_and_exit, parser  # noqa: E402


def main() -> None:
    p = parser(__doc__, tol=1e-4)
    p.add_argument(
        "--no-tokenizer-check",
        action="store_true",
        help="a directory litgpt wrote itself: no bos/eos convention to check",
    )
    a = p.parse_args()
    d = Path(a.model_dir)

    config = Config.from_file(d / "model_config.yaml")
    model = GPT(config)
    state = torch.load(d / "lit_model.pth", weights_only=True, mmap=True)
    state = state.get("model", state)  # litgpt's training checkpoints nest the weights
    model.load_state_dict(state, strict=True)  # every key and shape, nothing left over
    model.eval()
    with torch.no_grad():
        ours = model(torch.tensor([a.tokens]))[0].float()  # (T, V)

    if not a.no_tokenizer_check:
        tok = Tokenizer(d)
        sep = tok.bos_id
        if sep is None or tok.eos_id != sep or not tok.use_bos:
            sys.exit(f"tokenizer: bos {tok.bos_id}, eos {tok.eos_id}, use_bos {tok.use_bos}")
        encoded = tok.encode("Once upon a time").tolist()
        if encoded[0] != sep:
            sys.exit(f"tokenizer: prompts do not start with the separator {sep}: {encoded}")
        print(f"separator {sep}")
    compare_and_exit("litgpt", ours, a)


if __name__ == "__main__":
    main()
