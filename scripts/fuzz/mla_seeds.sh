#!/usr/bin/env bash
# scripts/fuzz/mla_seeds.sh OUT — the fuzz seeds that mla itself writes or reads every day: a
# tiny run's checkpoint (model/optimizer safetensors, manifest.json, config.yaml), its litgpt
# export (lit_model.pth through libtorch's pickle_save), a prepared dataset (index.json, a
# shard's header, a worker's partial index), the config_hub YAMLs, and TinyStories text as
# .txt/.jsonl/.json (plain, .gz, .zst) and Parquet. Called by scripts/fuzz.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$1
mla=target/release/mla
data=${MLA_SHARED_DATA:-../shared/data}
tok=$data/tokenizers/gpt-neox-20b
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for t in torch_save safetensors manifest shard_index config_yaml text parquet; do mkdir -p "$out/$t"; done

# Text: the head of TinyStories in every format `mla prepare` reads.
head -c 20000 "$data/tinystories/train/tinystories_v1_train_head.txt" >"$tmp/stories.txt"
head -c 5000 "$data/tinystories/valid/tinystories_v1_valid_head.txt" >"$tmp/val.txt"
.venv/bin/python - "$tmp/stories.txt" "$out" <<'PY'
# fuzz_text's inputs are [mode][bytes]: mode % 4 = txt, jsonl, json, tar; mode / 4 = plain,
# gzip, zstd (see fuzz/targets/text.rs).
import gzip, io, json, shutil, subprocess, sys, tarfile
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
text, out = Path(sys.argv[1]).read_text(), Path(sys.argv[2])
stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()][:20]
files = {
    0: "\n<|endoftext|>\n".join(stories[:8]).encode(),
    1: "".join(json.dumps({"story": s}) + "\n" for s in stories[:8]).encode(),
    2: json.dumps([{"text": s} for s in stories[:8]]).encode(),
}
zstd = shutil.which("zstd")
for fmt, b in files.items():
    (out / "text" / f"plain-{fmt}").write_bytes(bytes([fmt]) + b)
    (out / "text" / f"gzip-{fmt}").write_bytes(bytes([fmt + 4]) + gzip.compress(b))
    if zstd:
        z = subprocess.run([zstd, "-q", "-c"], input=b, capture_output=True, check=True).stdout
        (out / "text" / f"zstd-{fmt}").write_bytes(bytes([fmt + 8]) + z)
for form, long in ((tarfile.GNU_FORMAT, "gnu"), (tarfile.PAX_FORMAT, "pax")):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=form) as t:
        for i, (name, b) in enumerate((("a.txt", files[0]), ("d/" + "x" * 120 + ".jsonl", files[1]))):
            info = tarfile.TarInfo(name)
            info.size = len(b)
            t.addfile(info, io.BytesIO(b))
    (out / "text" / f"tar-{long}").write_bytes(bytes([3]) + buf.getvalue())
table = pa.table({"id": list(range(len(stories))), "text": stories})
pq.write_table(table, out / "parquet" / "snappy.parquet", compression="snappy", row_group_size=7)
pq.write_table(table, out / "parquet" / "zstd.parquet", compression="zstd", row_group_size=20)
pq.write_table(table, out / "parquet" / "plain.parquet", compression="none", use_dictionary=False)
pq.write_table(table, out / "parquet" / "v2.parquet", data_page_version="2.0", compression="none")
PY

# A prepared dataset, and two workers' partial indexes.
$mla prepare "$tmp/stories.txt" --val "$tmp/val.txt" --tokenizer-dir "$tok" --out "$tmp/ds" --quiet >/dev/null
cp "$tmp/ds/index.json" "$out/shard_index/index.json"
head -c 96 "$tmp/ds/train-00000.bin" >"$out/shard_index/shard-header.bin"
$mla prepare "$tmp/stories.txt" --tokenizer-dir "$tok" --out "$tmp/w" --worker 0/2 --quiet >/dev/null
cp "$tmp/w/index-worker-0000.json" "$out/shard_index/index-worker-0000.json"

# A tiny run's checkpoint and its litgpt export.
$mla train --device cpu --config config_hub/pretrain/debug.yaml --out_dir "$tmp/run" \
  --data.train_data_path "$tmp/ds" --data.val_data_path null --tokenizer_dir "$tok" \
  --model_config.block_size 32 --model_config.n_embd 16 --model_config.n_head 2 \
  --model_config.latent_attention false \
  --train.micro_batch_size 2 --train.global_batch_size 4 --train.max_steps 2 \
  --train.lr_warmup_steps 1 --eval.initial_validation false >"$tmp/train.log" 2>&1 ||
  { cat "$tmp/train.log" >&2; exit 1; }
final=$tmp/run/final
cp "$final/model.safetensors" "$out/safetensors/model.safetensors"
cp "$final/optimizer.safetensors" "$out/safetensors/optimizer.safetensors"
cp "$final/manifest.json" "$out/manifest/manifest.json"
cp "$final/config.yaml" "$out/config_yaml/checkpoint-config.yaml"
cp config_hub/pretrain/*.yaml "$out/config_yaml/"
$mla export "$final" "$tmp/lit" --to litgpt >/dev/null
cp "$tmp/lit/lit_model.pth" "$out/torch_save/lit_model.pth"
echo "mla_seeds.sh: $(find "$out" -type f | wc -l) seeds under $out"
