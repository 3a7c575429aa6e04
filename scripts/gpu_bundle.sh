#!/usr/bin/env bash
# Builds what the GPU check needs on a machine without Rust: the release binary, the GPU
# test binaries (tests/gpu.rs, tests/gpu_decoder.rs) and the kernel benchmark, with every kernel compiled in, into gpu-bundle/
# (git-ignored). Then, on the GPU machine, from the repository root:
#   bash scripts/gpu_check.sh gpu-bundle
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=$(bash scripts/install_nvcc.sh | tail -1)
export NVCC REGMEAN_REQUIRE_CUDA=1
cargo build --release --quiet
executable() { # cargo subcommand..., target name: the executable cargo built for it
  local name=${*: -1}
  cargo "${@:1:$#-1}" --message-format=json 2>/dev/null | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$name"
}
test_bin=$(executable test --release --no-run --test gpu gpu)
decoder_test_bin=$(executable test --release --no-run --test gpu_decoder gpu_decoder)
capi_test_bin=$(executable test --release --no-run -p regmean-gpu-capi --test capi_gpu capi_gpu)
bench_bin=$(executable bench --no-run --bench kernels kernels)
rm -rf gpu-bundle && mkdir gpu-bundle
cp target/release/regmean-gpu gpu-bundle/
cp "$test_bin" gpu-bundle/gpu-tests
cp "$decoder_test_bin" gpu-bundle/gpu-decoder-tests
cp "$capi_test_bin" gpu-bundle/capi-gpu-tests
cp "$bench_bin" gpu-bundle/kernel-bench
strip gpu-bundle/* 2>/dev/null || true
du -sh gpu-bundle/*
