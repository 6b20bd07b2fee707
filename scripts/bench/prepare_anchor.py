"""The Python anchor of `mla prepare` throughput (issue 12): the pipeline of llm.c's fineweb.py
(a multiprocessing pool tokenizing documents, each prefixed by the end-of-text token, written
as uint16), with Hugging Face `tokenizers` batch-encoding chunks of stories instead of tiktoken.

    python prepare_anchor.py --tokenizer DIR/tokenizer.json --train DIR --val DIR --out DIR [--procs N]

Reads the same .txt inputs `mla prepare TRAIN --val VAL` reads (stories separated by lines that
are exactly <|endoftext|>, trimmed, empty ones skipped), writes train.bin / val.bin (raw uint16,
no header) and prints one JSON line: tokens per split, seconds (reading to written), tokens/s.
"""
import argparse
import glob
import json
import multiprocessing as mp
import os
import time

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the pool is the parallelism

SEP = "<|endoftext|>"
_tok = None
_eot = None


def _init(path):
    global _tok, _eot
    from tokenizers import Tokenizer

    _tok = Tokenizer.from_file(path)
    _eot = _tok.token_to_id(SEP)


def _encode(stories):
    out = []
    for enc in _tok.encode_batch(stories, add_special_tokens=False):
        out.append(_eot)
        out.extend(enc.ids)
    return np.asarray(out, dtype=np.uint16)


def stories_of(directory):
    for path in sorted(glob.glob(os.path.join(directory, "*.txt"))):
        with open(path, encoding="utf-8") as f:
            story = []
            for line in f:
                if line.rstrip("\n") == SEP:
                    s = "".join(story).strip()
                    if s:
                        yield s
                    story = []
                else:
                    story.append(line)
            s = "".join(story).strip()
            if s:
                yield s


def chunks(it, n):
    batch = []
    for s in it:
        batch.append(s)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--procs", type=int, default=os.cpu_count())
    ap.add_argument("--chunk", type=int, default=256, help="stories per encode_batch call")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    counts = {}
    with mp.Pool(a.procs, initializer=_init, initargs=(a.tokenizer,)) as pool:
        pool.map(len, [[]] * a.procs)  # workers up and their tokenizer loaded before timing
        start = time.perf_counter()
        for split, directory in (("train", a.train), ("val", a.val)):
            n = 0
            with open(os.path.join(a.out, f"{split}.bin"), "wb") as f:
                for arr in pool.imap(_encode, chunks(stories_of(directory), a.chunk)):
                    f.write(arr.tobytes())
                    n += len(arr)
            counts[split] = n
        secs = time.perf_counter() - start
    total = sum(counts.values())
    print(json.dumps({"tokens": counts, "secs": secs, "tokens_per_sec": total / secs, "procs": a.procs}))


if __name__ == "__main__":
    main()
