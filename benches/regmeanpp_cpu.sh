#!/usr/bin/env bash
# RegMean++ on the CPU, regmean-gpu against FusionBench's RegMeanAlgorithmForCLIPPlusPlus loop
# (benches/pytorch_regmean.py --mode fusionbench_pp), interleaved rounds at 2 threads each,
# wall time and peak RSS per run. From the repository root:
#   POOL=target/bench-pools/clip8-small ROUNDS="1 2 3" bash benches/regmeanpp_cpu.sh
# POOL holds the harness's clip8-small pool (benches/run_bench.py makes it) with pp.yaml: its
# bench config with `merge_method: regmean_plusplus`. PY is a Python with torch, transformers
# 4.x and fusion-bench 0.2.33 (default .venv/bin/python); BIN the binary to time.
set -uo pipefail
pool=${POOL:-target/bench-pools/clip8-small}
bin=${BIN:-target/release/regmean-gpu}
py=${PY:-.venv/bin/python}
out=${OUT:-target/regmeanpp-bench}
mkdir -p "$out"
for r in ${ROUNDS:-1 2 3}; do
  rm -rf "$out/ours$r" "$out/fb$r"
  s=$(date +%s.%N)
  /usr/bin/time -v "$bin" merge -q "$pool/pp.yaml" "$out/ours$r" --threads 2 \
    --report-json "$out/regmean-gpu-$r.json" 2> "$out/ours$r.time" > /dev/null
  e=$(date +%s.%N)
  echo "regmean-gpu $r $(echo "$e - $s" | bc) s, peak $(grep Maximum "$out/ours$r.time" | awk '{print $6}') kB"
  s=$(date +%s.%N)
  /usr/bin/time -v "$py" benches/pytorch_regmean.py --mode fusionbench_pp --config "$pool/pp.yaml" \
    --out "$out/fb$r" --threads 2 > "$out/fusionbench_pp-$r.log" 2> "$out/fb$r.time"
  e=$(date +%s.%N)
  echo "fusionbench_pp $r $(echo "$e - $s" | bc) s, peak $(grep Maximum "$out/fb$r.time" | awk '{print $6}') kB"
done
