#!/usr/bin/env bash
# The CPU forward pass alone, regmean-gpu's against transformers', on one batch of 32 images
# of a clip8-small task model (ViT-B/32), interleaved rounds at the same thread count.
# From the repository root:
#   THREADS=2 ROUNDS="1 2 3" bash benches/forward_alone.sh
# Ours: `cargo bench --bench kernels -- forward` (its "forward alone" line, beside forward +
# Grams; it makes the model and images under target/bench-kernels/vit-b32 the first time).
# Theirs: benches/pytorch_forward.py on the same files. PY: a Python with torch and
# transformers (default .venv/bin/python).
set -euo pipefail
threads=${THREADS:-2}
py=${PY:-.venv/bin/python}
cargo bench --bench kernels --no-run 2>/dev/null
for r in ${ROUNDS:-1 2 3}; do
  echo "round $r"
  RAYON_NUM_THREADS=$threads cargo bench --bench kernels -- forward 2>/dev/null | grep -E "forward|floor"
  "$py" benches/pytorch_forward.py --threads "$threads" --repeats 3
done
