#!/usr/bin/env bash
# `mla prepare` throughput against the Python anchor (issue 12): the same TinyStories text
# (../shared/data/tinystories: train/ and valid/, 13 MB, 3.2M tokens), the same GPT-NeoX
# tokenizer and the same cores, one after the other, ROUNDS times; medians of tokens/s and of
# tokens/s per core. The anchor is scripts/bench/prepare_anchor.py (llm.c fineweb.py's
# multiprocessing pool, HF tokenizers' encode_batch per chunk of stories). mla reads the .txt
# files, and the same stories as Parquet (pyarrow, snappy, row groups of 10k) and .jsonl.gz.
# Every output is checked token for token against the anchor's before any figure is printed.
#
#   scripts/bench/prepare_throughput.sh [--rounds R] [--cores N]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
rounds=3 cores=$(nproc)
while (($#)); do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --cores) cores=$2; shift 2 ;;
    *) echo "usage: $0 [--rounds R] [--cores N]" >&2; exit 2 ;;
  esac
done
MLA=${MLA:-target/release/mla}
[ -x "$MLA" ] || cargo build --release --bin mla --quiet
PY=.venv/bin/python
D=../shared/data
tok=$D/tokenizers/gpt-neox-20b
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The same stories as Parquet and as .jsonl.gz, one file per split.
"$PY" - "$D/tinystories" "$tmp/in" <<'PYEOF'
import gzip, json, os, sys
import pyarrow as pa, pyarrow.parquet as pq
sys.path.insert(0, "scripts/bench")
from prepare_anchor import stories_of
src, out = sys.argv[1], sys.argv[2]
for split, d in (("train", "train"), ("val", "valid")):
    stories = list(stories_of(os.path.join(src, d)))
    for fmt in ("parquet", "jsonl.gz"):
        os.makedirs(os.path.join(out, fmt), exist_ok=True)
    pq.write_table(pa.table({"text": stories}), os.path.join(out, "parquet", f"{split}.parquet"),
                   compression="snappy", row_group_size=10000)
    with gzip.open(os.path.join(out, "jsonl.gz", f"{split}.jsonl.gz"), "wt", encoding="utf-8") as f:
        for s in stories:
            f.write(json.dumps({"text": s}) + "\n")
PYEOF

# Tokens/s of one mla run, after checking its token streams against the anchor's.
check_and_rate() { # OUT REPORT_LINE
  "$PY" - "$1" "$tmp/anchor" "$2" <<'PYEOF'
import glob, json, os, re, sys
import numpy as np
out, anchor, line = sys.argv[1], sys.argv[2], sys.argv[3]
for split in ("train", "val"):
    got = np.concatenate([np.fromfile(p, dtype=np.uint16)[16:] for p in sorted(glob.glob(f"{out}/{split}-*.bin"))])
    want = np.fromfile(f"{anchor}/{split}.bin", dtype=np.uint16)
    if not np.array_equal(got, want):
        sys.exit(f"{out}: {split} tokens differ from the anchor's ({len(got)} vs {len(want)})")
print(re.search(r"([0-9.]+) s, ([0-9]+) tokens/s", line).group(2))
PYEOF
}

median() { "$PY" -c "import statistics,sys; print(round(statistics.median(float(x) for x in sys.argv[1:])))" "$@"; }

declare -A rates
for r in $(seq "$rounds"); do
  a=$("$PY" scripts/bench/prepare_anchor.py --tokenizer "$tok/tokenizer.json" --train "$D/tinystories/train" \
    --val "$D/tinystories/valid" --out "$tmp/anchor" --procs "$cores")
  rates[anchor]+=" $("$PY" -c "import json,sys; print(round(json.loads(sys.argv[1])['tokens_per_sec']))" "$a")"
  for fmt in txt parquet jsonl.gz; do
    case $fmt in
      txt) inputs=("$D/tinystories/train" --val "$D/tinystories/valid") ;;
      *) inputs=("$tmp/in/$fmt/train.$fmt" --val "$tmp/in/$fmt/val.$fmt") ;;
    esac
    line=$("$MLA" prepare "${inputs[@]}" --tokenizer-dir "$tok" --out "$tmp/mla-$fmt" --threads "$cores" \
      --overwrite --quiet)
    rates[$fmt]+=" $(check_and_rate "$tmp/mla-$fmt" "$line")"
  done
done

echo "$cores cores ($(nproc) on the machine), $rounds rounds, TinyStories train + valid from ../shared/data (3.18M tokens), GPT-NeoX tokenizer; every output equal token for token"
printf '| pipeline | tokens/s (median) | tokens/s per core | rounds |\n|---|---|---|---|\n'
for k in anchor txt parquet jsonl.gz; do
  # shellcheck disable=SC2086
  m=$(median ${rates[$k]})
  name=$([ "$k" = anchor ] && echo "Python anchor (multiprocessing pool × HF tokenizers encode_batch)" || echo "mla prepare, .$k input")
  printf '| %s | %s | %s | %s |\n' "$name" "$m" "$((m / cores))" "${rates[$k]# }"
done
