#!/usr/bin/env bash
# Installs nvcc for CUDA 13.0 from the Python package index into .cuda/ (git-ignored), so
# that build.rs can compile the kernels on a machine without a CUDA toolkit or a GPU.
# Prints the path of nvcc on its last line. Re-running is cheap: it checks first.
#
#   bash scripts/install_nvcc.sh            # then: export NVCC=$(bash scripts/install_nvcc.sh | tail -1)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cuda/site
nvcc="$dest/nvidia/cu13/bin/nvcc"
if [ ! -x "$nvcc" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$dest" \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" >&2
fi
"$nvcc" --version | tail -2 >&2
realpath "$nvcc"
