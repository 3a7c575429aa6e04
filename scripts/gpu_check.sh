#!/usr/bin/env bash
# Every GPU check, in one run, over carried binaries (see scripts/gpu_bundle.sh):
#   1. where the driver, cuBLAS and cuSOLVER live;  2. `doctor` (every kernel against its
#   CPU twin);  3. the GPU tests (the forward layer by layer, merges; tests/gpu.rs and
#   tests/gpu_decoder.rs);  4. `merge --device cuda` of the tiny test pools against
#   `--device cpu`, in float32 (to 1e-4) and float16 (to 1e-2), the decoder LLM pools as a
#   step of their own;  5. the kernel benchmark (`cargo bench --bench kernels`, carried as
#   kernel-bench: doctor's kernel checks, then the GPU and CPU kernel timings).
# One log per step goes to $OUT (or gpu-logs/); a summary table is printed last. Run from the repo root:
#   bash scripts/gpu_check.sh [BUNDLE_DIR]
# STEPS="doctor gpu-tests" runs only the steps named; STEP_TIMEOUT bounds each (150 s).
set -uo pipefail
bundle=${1:-gpu-bundle}
out=${OUT:-gpu-logs}
mkdir -p "$out"
bin="$bundle/regmean-gpu"
declare -a summary
step() { # name, command...
  local name=$1; shift
  # STEPS="doctor gpu-tests ..." runs only those (a second run on a short lease).
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
  local start=$(date +%s)
  # Each step is bounded so that one hang cannot eat the machine's whole lease.
  if timeout "${STEP_TIMEOUT:-150}" bash -c "$*" > "$out/$name.log" 2>&1; then r=PASS; else r=FAIL; fi
  summary+=("$(printf '%-28s %-5s %4ss  %s' "$name" "$r" "$(( $(date +%s) - start ))" "$out/$name.log")")
  echo "== $name: $r"; tail -n 25 "$out/$name.log"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  echo "--- loader paths"; ldconfig -p | grep -E 'libcuda\.so|libcublas\.so|libcublasLt\.so|libcusolver\.so' || true
  echo "--- files"; find / \( -name 'libcublas.so*' -o -name 'libcusolver.so*' -o -name 'libcuda.so*' \) -not -path '*/proc/*' 2>/dev/null | head -20
} > "$out/environment.log" 2>&1
cat "$out/environment.log"
# cuBLAS/cuSOLVER may live only inside a Python wheel (PyTorch's): put them on the loader path.
if ! ldconfig -p | grep -q 'libcusolver\.so'; then
  dir=$(dirname "$(find / -name 'libcusolver.so*' -not -path '*/proc/*' 2>/dev/null | head -1)" 2>/dev/null)
  blas=$(dirname "$(find / -name 'libcublas.so*' -not -path '*/proc/*' 2>/dev/null | head -1)" 2>/dev/null)
  export LD_LIBRARY_PATH="${dir:-}:${blas:-}:${LD_LIBRARY_PATH:-}"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
fi

# On the GPU machine a skipped check is a failed one.
has_gpu() { "$bin" doctor --json 2>/dev/null | grep -q '"cuda_available": true'; }
doctor() { "$bin" doctor && has_gpu; }
gpu_tests() { # the GPU tests are #[ignore]d where cargo test runs; here they must all run
  local log
  log=$(env REGMEAN_REPO="$PWD" REGMEAN_BIN="$(realpath "$bin")" REGMEAN_REQUIRE_GPU=1 \
    "$bundle/gpu-tests" --include-ignored --nocapture --test-threads=1 2>&1); local rc=$?
  # The decoder LLMs' CUDA forward pass and merges (tests/gpu_decoder.rs), where the
  # bundle has them.
  if [ -x "$bundle/gpu-decoder-tests" ]; then
    log+=$'\n'$(env REGMEAN_REPO="$PWD" REGMEAN_BIN="$(realpath "$bin")" REGMEAN_REQUIRE_GPU=1 \
      "$bundle/gpu-decoder-tests" --include-ignored --nocapture --test-threads=1 2>&1) || rc=1
  fi
  # The C ABI's CUDA test (capi/tests/capi_gpu.rs), where the bundle has it.
  if [ -x "$bundle/capi-gpu-tests" ]; then
    log+=$'\n'$(env REGMEAN_REQUIRE_GPU=1 "$bundle/capi-gpu-tests" --include-ignored \
      --nocapture --test-threads=1 2>&1) || rc=1
  fi
  echo "$log"
  [ $rc -eq 0 ] && ! grep -q SKIPPED <<< "$log" && ! grep -qE '[1-9][0-9]* ignored' <<< "$log"
}
bench() { "$bundle/kernel-bench" --bench && has_gpu; }
merge_pair() { # pool config: the whole merge on cuda against cpu, float32 and float16
  local tmp; tmp=$(mktemp -d)
  "$bin" merge -q "tests/fixtures/$1/$2" "$tmp/cpu" --device cpu &&
  "$bin" merge "tests/fixtures/$1/$2" "$tmp/f32" --device cuda --precision float32 &&
  "$bin" compare "$tmp/f32" "$tmp/cpu" --tol 1e-4 -v &&
  "$bin" merge "tests/fixtures/$1/$2" "$tmp/f16" --device cuda --precision float16 &&
  "$bin" compare "$tmp/f16" "$tmp/cpu" --tol 1e-2
}
decoder_merges() { # the decoder LLMs' merge on cuda (unverified on a GPU until this passes)
  merge_pair llm/llama_pool default.yaml && merge_pair llm/qwen2_pool default.yaml
}
merges() {
  merge_pair gpt2_pool compat.yaml && merge_pair gpt2_pool default.yaml &&
    merge_pair gpt2_pool exclude.yaml && merge_pair clip_pool compat.yaml &&
    merge_pair clip_pool default.yaml
}
evals() { # eval on cuda (float32) against cpu: the same accuracy per task; merge --eval on cuda
  local spec p c m
  for spec in gpt2:merge_text.yaml:task_a clip:merge_folder.yaml:task_a; do
    IFS=: read -r p c m <<< "$spec"
    "$bin" eval "tests/fixtures/eval/$p/$m" --config "tests/fixtures/eval/$p/$c" --json \
      --device cpu > /tmp/eval-cpu.json &&
    "$bin" eval "tests/fixtures/eval/$p/$m" --config "tests/fixtures/eval/$p/$c" --json \
      --device cuda > /tmp/eval-cuda.json &&
    cat /tmp/eval-cuda.json && diff /tmp/eval-cpu.json /tmp/eval-cuda.json || return 1
  done
  "$bin" merge tests/fixtures/eval/clip/merge_folder.yaml /tmp/eval-merged --force \
    --device cuda --eval --compare-average
}
export -f has_gpu doctor gpu_tests bench merge_pair merges decoder_merges evals
export bin bundle
step doctor doctor
step gpu-tests gpu_tests
step merge-cuda-vs-cpu merges
step decoder-merge-cuda-vs-cpu decoder_merges
step eval-cuda-vs-cpu evals
step kernel-bench bench

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
