#!/usr/bin/env bash
# Runs every fuzz target for a fixed time (default 75 s each), seeding the corpora from the
# test fixtures, and prints one line per target. Needs cargo-fuzz (`cargo install cargo-fuzz`);
# RUSTC_BOOTSTRAP=1 lets it pass its nightly-only flags to a stable compiler.
#   bash scripts/fuzz_all.sh [SECONDS]
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${1:-75}
f=tests/fixtures
mkdir -p fuzz/corpus/{safetensors_file,shard_index,model_config,merge_yaml,gram_file,jsonl_data,image_file,preprocessor_config}
cp $f/gpt2_forward/expected.safetensors $f/clip_forward/pixel_values.safetensors fuzz/corpus/safetensors_file/
cp $f/clip_pool/task_c/model.safetensors.index.json fuzz/corpus/shard_index/
cp $f/gpt2_pool/base/config.json fuzz/corpus/model_config/gpt2.json
cp $f/clip_pool/base/config.json fuzz/corpus/model_config/clip.json
cp $f/gpt2_pool/compat.yaml $f/gpt2_pool/exclude.yaml fuzz/corpus/merge_yaml/
cp $f/gpt2_pool/data/task_a.jsonl $f/gpt2_forward/inputs.jsonl fuzz/corpus/jsonl_data/
cp $f/eval/gpt2/task_a.jsonl fuzz/corpus/jsonl_data/text.jsonl
# Small images of every format the decoder takes (the larger fixtures slow the fuzzer down).
find $f/eval -type f \( -name '*.jpg' -o -name '*.png' -o -name '*.webp' \) -size -20k \
  -exec cp {} fuzz/corpus/image_file/ \;
find $f/eval -name preprocessor_config.json -exec cp {} fuzz/corpus/preprocessor_config/ \;
echo '{"size": {"shortest_edge": 224}, "crop_size": 224}' > fuzz/corpus/preprocessor_config/default.json
failed=0
for t in safetensors_file shard_index model_config merge_yaml gram_file jsonl_data image_file \
  preprocessor_config; do
  log="fuzz/$t.log"
  RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -max_len=8192 > "$log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || failed=1
  echo "$t: exit $rc, $(grep -E 'DONE' "$log" | tail -1 | sed 's/ *lim:.*//')"
done
exit $failed
