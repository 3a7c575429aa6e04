#!/usr/bin/env bash
# The Python package's tests (python/tests): builds the package from this checkout with
# `pip install .` into a virtual environment, then runs pytest. The environment
# (REGMEAN_PY_VENV, default .venv-python) is made once, with torch, transformers 4.57.x and
# fusion-bench 0.2.33 for the FusionBench drop-in tests; later runs reuse it and only
# rebuild the package. The tests compare against the CLI binary of `cargo build --release`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${REGMEAN_PY_VENV:-.venv-python}
PY=${PYTHON:-python3}
started=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" - <<'PY' 2>/dev/null; then
import importlib.metadata as m, sys
ok = m.version("fusion-bench") == "0.2.33" and m.version("transformers").startswith("4.57.")
import torch, pytest, safetensors  # noqa: F401
sys.exit(0 if ok else 1)
PY
  echo "installing torch, transformers 4.57.x and fusion-bench 0.2.33 into $VENV (once)"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q pytest safetensors torch "transformers==4.57.*" "fusion-bench==0.2.33"
fi

# The CLI the tests compare against (a no-op after `cargo test --release`).
cargo build --release --bin regmean-gpu
# The package itself, built from this checkout (with the CUDA kernels when NVCC is set).
"$VENV/bin/pip" install -q --force-reinstall --no-deps .

"$VENV/bin/python" -m pytest python/tests -q -p no:cacheprovider
echo "python tests: $(( $(date +%s) - started ))s"
