#!/usr/bin/env bash
# Peak resident memory of `regmean-gpu merge` for K = 2, 4 and 8 task models of realistic
# size (random-weight GPT-2 small, ~500 MB of f32 weights each). RegMean streams over the
# models, so the peak should not grow with K.
#
#   bash benches/memory_flat.sh [WORKDIR]     (default WORKDIR: target/bench-memory)
#
# Needs ~5 GB of disk for the pool. Prints one line per K and a markdown table at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-target/bench-memory}
examples=${EXAMPLES:-32}
cargo build --release --quiet
bin=target/release/regmean-gpu
if [ ! -f "$work/pool/merge.yaml" ]; then
  rm -rf "$work/pool"
  "$bin" synth --arch gpt2 --models 8 --examples "$examples" --min-len 16 --max-len 128 --out "$work/pool"
fi
rows=()
for k in 2 4 8; do
  cfg="$work/pool/merge_k$k.yaml"
  awk -v k="$k" '
    /^  - model:/ { n++ }
    /^parameters:/ { inparams = 1 }
    inparams || !/^  (- model|  data):/ || n <= k { print }
  ' "$work/pool/merge.yaml" > "$cfg"
  rm -rf "$work/out_k$k"
  start=$(date +%s.%N)
  summary=$("$bin" merge "$cfg" "$work/out_k$k" 2>&1 | grep -E "peak memory|merged ")
  end=$(date +%s.%N)
  peak=$(echo "$summary" | sed -n 's/.*peak memory \(.*\)$/\1/p')
  secs=$(echo "$end - $start" | bc)
  echo "K=$k  peak RSS $peak  wall ${secs}s"
  rows+=("| $k | $peak | ${secs%.*} s |")
  rm -rf "$work/out_k$k"
done
echo
echo "| models K | peak resident memory | wall time |"
echo "|---|---|---|"
printf '%s\n' "${rows[@]}"
