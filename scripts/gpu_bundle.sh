#!/usr/bin/env bash
# Builds what the GPU check needs on a machine without Rust: the release binary and the GPU
# test binary, with every kernel compiled in, into gpu-bundle/ (git-ignored). Then, on the
# GPU machine, from the repository root:  bash scripts/gpu_check.sh gpu-bundle
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=$(bash scripts/install_nvcc.sh | tail -1)
export NVCC REGMEAN_REQUIRE_CUDA=1
cargo build --release --quiet
test_bin=$(cargo test --release --no-run --test gpu --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
rm -rf gpu-bundle && mkdir gpu-bundle
cp target/release/regmean-gpu gpu-bundle/
cp "$test_bin" gpu-bundle/gpu-tests
strip gpu-bundle/* 2>/dev/null || true
du -sh gpu-bundle/*
