#!/usr/bin/env python3
"""transformers' CLIP vision forward pass alone, on the batch `cargo bench --bench kernels
forward` times ours on: one clip8-small task model (ViT-B/32, random weights) and its 32
images, made by that benchmark under target/bench-kernels/vit-b32.

    python benches/pytorch_forward.py [--threads 2] [--repeats 3]

Loads the model with `CLIPVisionModel.from_pretrained` (float32, eager attention, as
FusionBench's RegMean runs it), then, in inference mode at the given thread count, runs one
warm-up pass and `--repeats` timed ones over the 32 images in one batch. Prints one JSON
line: the median and every time in seconds. benches/forward_alone.sh interleaves it with
ours.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import CLIPVisionModel

ROOT = Path(__file__).resolve().parent.parent
POOL = ROOT / "target" / "bench-kernels" / "vit-b32"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not (POOL / "merge.yaml").exists():
        raise SystemExit(
            f"{POOL} is missing: run `cargo bench --bench kernels -- forward` first (it makes it)"
        )
    torch.set_num_threads(args.threads)
    model = CLIPVisionModel.from_pretrained(
        POOL / "task_0", torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with safe_open(str(POOL / "data" / "task_0.safetensors"), "pt") as f:
        pixels = f.get_slice("pixel_values")[0:32].to(torch.float32)
    times = []
    with torch.inference_mode():
        model(pixel_values=pixels)
        for _ in range(args.repeats):
            t = time.perf_counter()
            model(pixel_values=pixels)
            times.append(time.perf_counter() - t)
    print(json.dumps({
        "what": "transformers CLIPVisionModel forward, 32 images",
        "threads": args.threads,
        "torch": torch.__version__,
        "median_s": statistics.median(times),
        "times_s": times,
    }))


if __name__ == "__main__":
    main()
