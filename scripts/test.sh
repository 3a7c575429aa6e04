#!/usr/bin/env bash
# The whole test suite, as CI runs it: the Rust tests (CPU only; the GPU tests are reported
# as ignored), then the Python package's tests (scripts/test_python.sh: the first run makes
# its virtual environment, with torch).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release
bash scripts/test_python.sh
