#!/usr/bin/env bash
# The GPU benchmarks, in one run on the device machine, over carried binaries (see
# scripts/gpu_bundle.sh), after scripts/gpu_check.sh. From the repository root:
#   bash scripts/gpu_bench.sh [BUNDLE_DIR]
# Writes to $OUT (or gpu-logs/):
#   bench-clip8.log   W-CLIP8 (8 × ViT-B/32, 256 images each) on cuda: regmean-gpu against
#                     the fusionbench and skilled PyTorch baselines (benches/run_bench.py);
#                     then (after "=== memory and cpu") device memory of K = 2 against
#                     K = 8 (W-CLIP8 models), a profile of the K = 8 merge, and the CPU
#                     engine against cuda on the W-CLIP8 models with 32 images each
#   bench-gpt2.log    W-GPT2-7 (7 × GPT-2 small, 256 sequences of 16–128 tokens), the same
#   (each log ends with the page-locked ring against pageable copies: REGMEAN_STAGING=0)
#   bench-llama-1b.log, bench-llama-8b.log
#                     the decoder LLMs on cuda (unverified on a GPU until these pass):
#                     llama-1b (Llama-3.2-1B shapes, random weights, 4 tasks × 256 × 1,024
#                     tokens) and, only when LLAMA_8B=1, llama-8b (8B shapes, 2 tasks × 64 ×
#                     2,048): regmean-gpu against benches/llama_small.py's MergeBench-faithful
#                     RegMean (llama-1b) and its skilled PyTorch one, on the GPU; each run is
#                     synthesis + merges, bounded by LLAMA_TIMEOUT (540 s) so that it fits
#                     one 10-minute device command: run llama-8b as a command of its own
#                     (ONLY=llama LLAMA_8B=1 SKIP_LLAMA_1B=1), it writes 48 GB under
#                     LLAMA_WORK (/tmp) and deletes them after
# Environment: REPEAT_CLIP (2), REPEAT_GPT2 (1), REPEAT_AB (3), BENCH_TIMEOUT (240 s per workload),
# SKIP_CPU=1 (no CPU engine run), SKIP_BENCH=1 (only the memory and profile runs), ONLY=llama
# (only the decoder runs), SKIP_LLAMA_1B=1, LLAMA_8B=1, LLAMA_TIMEOUT, LLAMA_WORK.
set -uo pipefail
bundle=${1:-gpu-bundle}
out=${OUT:-gpu-logs}
mkdir -p "$out"
bin="$PWD/$bundle/regmean-gpu"
threads=$(nproc)
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

bench() { # workload log repeats
  [ -n "${SKIP_BENCH:-}" ] && return
  timeout "${BENCH_TIMEOUT:-240}" "$py" benches/run_bench.py --workload "$1" --device cuda \
    --repeat "$3" --threads "$threads" --bin "$bin" --tol 1e-2 > "$out/$2" 2>&1
  echo "== $1: exit $?"; tail -n 14 "$out/$2"
  # The full results (for benches/plot_bench.py) after a marker line, in the same file.
  for f in target/bench-results/"$1"-cuda-*.json; do
    [ -f "$f" ] && { echo "=== results json"; cat "$f"; } >> "$out/$2"
  done
}

# The page-locked ring against plain pageable copies (REGMEAN_STAGING=0), same binary,
# interleaved (the order alternates per round): the wall time of each merge (process
# included), then the last round's two outputs compared, which must agree to rounding (a
# buffer reused before its copy ran shows as errors of 0.1 and more). Appended to the
# workload's log after a marker line.
staging_ab() { # workload log
  [ -n "${SKIP_BENCH:-}" ] && return
  local pool=target/bench-pools/$1 i s t0 t1 failed=0 order
  local phases='import json, sys; j = json.load(open(sys.argv[1])); p = j["phases_s"]; print("in-process %.2f fwd+grams %.2f solve %.2f write %.2f" % (j["total_s"], p["forward_and_grams"], p["solve"], p["write"]))'
  [ -f "$pool/bench.yaml" ] || { echo "== staging A/B on $1: no pool"; return; }
  {
    echo "=== staging A/B ($1, ${REPEAT_AB:-3} rounds; wall seconds)"
    for i in $(seq "${REPEAT_AB:-3}"); do
      order="1 0"; [ $((i % 2)) -eq 0 ] && order="0 1"
      failed=0
      for s in $order; do
        rm -rf "/tmp/ab-$1-$s" "/tmp/ab-$1-$s.json"; t0=$(date +%s.%N)
        REGMEAN_STAGING=$s timeout 120 "$bin" merge "$pool/bench.yaml" "/tmp/ab-$1-$s" \
          --device cuda -q --report-json "/tmp/ab-$1-$s.json" || { echo "merge failed (staging=$s)"; failed=1; }
        t1=$(date +%s.%N)
        echo "round $i staging=$s wall $(awk "BEGIN { printf \"%.2f\", $t1 - $t0 }")" \
          "$("$py" -c "$phases" "/tmp/ab-$1-$s.json" 2>/dev/null || echo "no report")"
      done
    done
    if [ $failed -eq 0 ]; then
      "$bin" compare "/tmp/ab-$1-1" "/tmp/ab-$1-0" --tol 1e-5 && echo "staged and pageable merges agree"
    else
      echo "not compared: a merge of the last round failed"
    fi
  } > "/tmp/ab-$1.log" 2>&1
  echo "== staging A/B on $1"; grep -E '^round|agree|tensors,|failed|error|not compared' "/tmp/ab-$1.log"
  cat "/tmp/ab-$1.log" >> "$out/$2"
}

# The decoder LLMs on cuda: synthesis (on the GPU) and the merges, time-boxed.
llama_bench() { # workload log impls baseline-dtype
  local work=${LLAMA_WORK:-/tmp}/$1
  timeout "${LLAMA_TIMEOUT:-540}" "$py" benches/llama_small.py --workload "$1" --device cuda \
    --repeats 1 --threads "$threads" --bin "$bin" --impls "$3" --baseline-dtype "$4" \
    --work "$work" > "$out/$2" 2>&1
  echo "== $1: exit $? (124: past LLAMA_TIMEOUT)"; tail -n 24 "$out/$2"
  rm -rf "$work"
}

if [ "${ONLY:-}" != llama ]; then
bench clip8 bench-clip8.log "${REPEAT_CLIP:-2}"
staging_ab clip8 bench-clip8.log

{
  pool=${MEM_POOL:-target/bench-pools/clip8}
  # The same models, K = 2 and K = 8, 256 images each; then 32 images each on cpu and cuda.
  "$py" - "$pool" <<'PYEOF'
import sys, yaml
pool = sys.argv[1]
cfg = yaml.safe_load(open(f"{pool}/bench.yaml"))
k2 = dict(cfg, models=cfg["models"][:2])
yaml.safe_dump(k2, open(f"{pool}/k2.yaml", "w"), sort_keys=False)
small = dict(cfg, parameters=dict(cfg["parameters"], num_regmean_examples=32))
yaml.safe_dump(small, open(f"{pool}/small.yaml", "w"), sort_keys=False)
PYEOF
  for k in k2 bench; do
    # The K = 8 run also prints where its time went (REGMEAN_PROFILE).
    REGMEAN_PROFILE=$([ $k = bench ] && echo 1 || echo 0) "$bin" merge "$pool/$k.yaml" \
      /tmp/mem-$k --device cuda --force -q --report-json /tmp/mem-$k.json
    echo "$k: $(tr -d '\n ' < /tmp/mem-$k.json)"
  done
  # SKIP_CPU=1 leaves out the CPU engine's run (≈ 45 s on 16 cores): for short leases.
  devices="cuda cpu"; [ -n "${SKIP_CPU:-}" ] && devices=cuda
  for dev in $devices; do
    timeout 120 "$bin" merge "$pool/small.yaml" /tmp/small-$dev --device $dev --force -q \
      --threads "$threads" --report-json /tmp/small-$dev.json
    echo "32 images, $dev: $(tr -d '\n ' < /tmp/small-$dev.json)"
  done
  [ -z "${SKIP_CPU:-}" ] && "$bin" compare /tmp/small-cuda /tmp/small-cpu --tol 1e-2
} > /tmp/memory-cpu.log 2>&1
echo "== memory and cpu"; tail -n 8 /tmp/memory-cpu.log
# Into the W-CLIP8 log, after a marker line: $OUT brings back few files.
{ echo "=== memory and cpu"; cat /tmp/memory-cpu.log; } >> "$out/bench-clip8.log"

bench gpt2-7 bench-gpt2.log "${REPEAT_GPT2:-1}"
staging_ab gpt2-7 bench-gpt2.log
fi

if [ -z "${SKIP_LLAMA_1B:-}" ]; then
  llama_bench llama-1b bench-llama-1b.log regmean-gpu,mergebench,skilled float32
fi
# llama-8b: MergeBench's per-module float32 Grams and Σ G'W would not fit beside the model
# (≈ 140 GB), so only the skilled baseline runs, its model in bfloat16. regmean-gpu's
# `schedule: auto` takes the layer-wise schedule at 8B (one whole model's sums, ≈ 190 GB,
# do not fit under half the host's memory): one layer of one model on the device, ≈ 9 GB by
# `merge --plan`. Unverified on a GPU until this run; its log says which schedule ran.
if [ -n "${LLAMA_8B:-}" ]; then
  llama_bench llama-8b bench-llama-8b.log regmean-gpu,skilled bfloat16
fi
