#!/usr/bin/env bash
# Where a GPU merge spends its time: synthesises 2 ViT-B/32 models with 256 images each, then
# merges them on cuda with REGMEAN_PROFILE=1 (twice in float16, once in float32) and prints
# the spans. On the GPU machine, from the repository root, over carried binaries
# (scripts/gpu_bundle.sh):   bash scripts/gpu_profile.sh
set -u
b=$PWD/gpu-bundle/regmean-gpu
t0=$(date +%s)
$b synth --arch clip --models 2 --examples 256 --out /tmp/pool -q --threads 16 || exit 1
echo "synth $(( $(date +%s) - t0 )) s"
python3 - <<'PY'
import yaml
cfg = yaml.safe_load(open('/tmp/pool/merge.yaml'))
cfg['parameters'] = dict(num_regmean_examples=256, batch_size=32, fusionbench_compat=True, shuffle=False, max_length=512, seed=0)
cfg['out_dtype'] = 'float32'
yaml.safe_dump(cfg, open('/tmp/pool/bench.yaml', 'w'), sort_keys=False)
PY
for i in 1 2; do
  REGMEAN_PROFILE=1 $b merge /tmp/pool/bench.yaml /tmp/out --force --device cuda --report-json /tmp/r.json 2>&1 | tail -n 16
  grep -A8 phases_s /tmp/r.json
done
REGMEAN_PROFILE=1 $b merge /tmp/pool/bench.yaml /tmp/out --force --device cuda --precision float32 2>&1 | tail -n 12
