#!/usr/bin/env python3
"""Decoder-LLM workloads: regmean-gpu against RegMean in PyTorch, side by side.

    python benches/llama_small.py [--workload llama-small] [--device cpu] [--threads 2]
                                  [--repeats 3] [--work /tmp/llama-small]

Workloads (random weights, seeded, synthesised once into ``--work``; a base and task models
that are the base plus noise, each task with EXAMPLES sequences of TOKENS random token ids):

* ``llama-small`` (the CPU workload): a ``LlamaForCausalLM`` of 4 layers, d 512, ffn 1536,
  8 heads / 4 kv heads, vocab 8192, untied head, float32; 4 tasks × 64 × 256 tokens.
* ``llama-1b`` (GPU): Llama-3.2-1B's shapes (16 layers, d 2048, ffn 8192, 32 / 8 heads,
  vocab 128256, tied embeddings, llama3 RoPE), stored bfloat16; 4 tasks × 256 × 1,024.
* ``llama-8b`` (GPU): Llama-3.1-8B's shapes (32 layers, d 4096, ffn 14336, 32 / 8 heads,
  vocab 128256, untied head), stored bfloat16; 2 tasks × 64 × 2,048. To fit a 64 GB disk
  the first task model doubles as the base (the base supplies only the architecture and
  the layout: RegMean merges and averages the task models), and the merge is written in
  bfloat16.

The weights are drawn on ``--device`` (a GPU makes an 8B model in seconds). Then, at the
same thread count and on the same device, alternating runs for ``--repeats`` rounds, it
times the whole merge (reading the models, forward passes and Grams, solve, writing) of:

* ``regmean-gpu``: ``regmean-gpu --threads N merge CONFIG OUT --device DEVICE``;
* ``mergebench``: MergeBench's RegMean as its code does it (``regmean_utils.compute_grams``
  and the merge loop of its RegMean): a forward hook on every ``nn.Linear`` (q, k and v
  each their own), batch 1, the running mean ``G = (G·n + XᵀX)/(n + rows)`` in float32,
  ``reduce_non_diag``, Σ G', Σ G'Wᵀ, then ``torch.linalg.cond`` of Σ G' and
  ``torch.linalg.pinv`` above 1e8 (or a zero diagonal) else ``torch.inverse``; the rest
  averaged. One difference, so that both merge the same set: ``lm_head`` (untied) is
  merged by RegMean here, as regmean-gpu does, where MergeBench's loop skips it (a tied
  head is the embeddings, averaged by both);
* ``skilled``: what a careful PyTorch user writes: inference mode, batch 8, one Gram per
  distinct input (q/k/v and gate/up share one) as an un-normalised ``addmm_`` sum,
  ``torch.linalg.cholesky`` + ``cholesky_solve`` in float32.

``--impls`` picks which run (llama-8b's MergeBench baseline needs its per-module Grams and
Σ G'W in float32 besides the model: about 140 GB, more than one H200 has, so
scripts/gpu_bench.sh runs it with ``--impls regmean-gpu,skilled``). ``--baseline-dtype``
is the PyTorch models' dtype (float32; bfloat16 halves their memory, and their Grams are
then taken from bfloat16 activations, as MergeBench does when it loads models so).

Every sequence is TOKENS tokens (no padding), so all three compute the same Grams. Prints
one JSON object: median seconds per implementation, the ratios, and the worst relative
difference per tensor between regmean-gpu's output and each PyTorch one (compared in
memory; the PyTorch merges are not written).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
RATIO = 0.1

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
WORKLOADS = {
    "llama-small": dict(
        config=dict(vocab_size=8192, hidden_size=512, intermediate_size=1536,
                    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                    max_position_embeddings=512, tie_word_embeddings=False),
        tasks=4, examples=64, tokens=256, batch=8, dtype="float32", base=True,
        out_dtype="float32",
        label="llama-small (4 layers, d 512, ffn 1536, 4 tasks × 64 × 256 tokens)"),
    "llama-1b": dict(
        config=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                    rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True),
        tasks=4, examples=256, tokens=1024, batch=8, dtype="bfloat16", base=True,
        out_dtype="float32",
        label="llama-1b (Llama-3.2-1B shapes, random weights, 4 tasks × 256 × 1,024 tokens)"),
    "llama-8b": dict(
        config=dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
                    rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE, factor=8.0),
                    tie_word_embeddings=False),
        tasks=2, examples=64, tokens=2048, batch=4, dtype="bfloat16", base=False,
        out_dtype="bfloat16",
        label="llama-8b (Llama-3.1-8B shapes, random weights, 2 tasks × 64 × 2,048 tokens)"),
}


def tasks_of(w: dict) -> list[str]:
    return [f"task_{chr(ord('a') + i)}" for i in range(w["tasks"])]


def save_model(state: dict, config: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, out / "model.safetensors",
              {"format": "pt"})


def synthesise(work: Path, name: str, device: str) -> Path:
    w = WORKLOADS[name]
    cfg_path = work / f"{name.replace('-', '_')}.yaml"
    if cfg_path.exists():
        return cfg_path
    config = dict(w["config"], model_type="llama", architectures=["LlamaForCausalLM"],
                  torch_dtype=w["dtype"], hidden_act="silu")
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**w["config"]))
        shapes = {k: v.shape for k, v in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        shapes.pop("lm_head.weight", None)  # the embeddings, stored once
    dtype = getattr(torch, w["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    base = {}
    for n, shape in shapes.items():
        x = torch.randn(shape, generator=g, device=device)
        base[n] = (1 + 0.1 * x if "norm" in n else x / shape[-1] ** 0.5).to(dtype)
    if w["base"]:
        save_model(base, config, work / "base")
    (work / "data").mkdir(exist_ok=True)
    for t in tasks_of(w):
        task = {}
        for n, p in base.items():
            p32 = p.float()
            noise = torch.randn(p.shape, generator=g, device=device)
            task[n] = (p32 + 0.2 * p32.abs().mean() * noise).to(dtype)
        save_model(task, config, work / t)
        del task
        with open(work / "data" / f"{t}.jsonl", "w") as f:
            ids = torch.randint(0, config["vocab_size"], (w["examples"], w["tokens"]),
                                generator=g, device=device).tolist()
            for seq in ids:
                f.write(json.dumps({"input_ids": seq}) + "\n")
    del base
    cfg = {
        "merge_method": "regmean",
        "base_model": "./base" if w["base"] else f"./{tasks_of(w)[0]}",
        "models": [{"model": f"./{t}", "data": f"./data/{t}.jsonl"} for t in tasks_of(w)],
        "parameters": {"num_regmean_examples": w["examples"], "batch_size": w["batch"],
                       "reduce_non_diagonal_ratio": RATIO, "max_length": w["tokens"],
                       "shuffle": False},
        "out_dtype": w["out_dtype"],
    }
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg_path


def sequences(work: Path, task: str) -> list[list[int]]:
    return [json.loads(line)["input_ids"] for line in open(work / "data" / f"{task}.jsonl")]


def load(work: Path, task: str, device: str, dtype: torch.dtype):
    return LlamaForCausalLM.from_pretrained(work / task, dtype=dtype).to(device).eval()


def mergebench(work: Path, tasks: list[str], device: str, dtype: torch.dtype) -> dict:
    """MergeBench's RegMean, per the module docstring."""
    sum_gram, sum_gw, sums, names = {}, {}, {}, None
    for t in tasks:
        model = load(work, t, device, dtype)
        tied = model.config.tie_word_embeddings
        covs, xn = {}, {}

        def hook_for(name):
            def hook(module, inp, _out):
                x = inp[0].detach()
                x = x.view(-1, x.size(-1))
                xtx = torch.matmul(x.transpose(0, 1), x)
                if name not in covs:
                    covs[name] = xtx / x.size(0)
                    xn[name] = x.size(0)
                else:
                    covs[name] = (covs[name] * xn[name] + xtx) / (x.size(0) + xn[name])
                    xn[name] += x.size(0)
            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and not (tied and n == "lm_head")]
        with torch.no_grad():
            for s in sequences(work, t):
                model(input_ids=torch.tensor([s], device=device))
        for h in handles:
            h.remove()
        state = model.state_dict()
        if tied:
            state.pop("lm_head.weight", None)  # the embeddings, averaged as such
        names = list(state)
        for name, cov in covs.items():
            a = RATIO
            diag_weight = torch.diag(torch.ones(cov.size(0), dtype=cov.dtype, device=cov.device) - a)
            weight = diag_weight + torch.zeros_like(diag_weight).fill_(a)
            g_red = cov * weight
            gw = torch.matmul(g_red, state[name + ".weight"].transpose(0, 1))
            if name in sum_gram:
                sum_gram[name].add_(g_red)
                sum_gw[name].add_(gw)
            else:
                sum_gram[name], sum_gw[name] = g_red.clone(), gw.clone()
        for name in names:
            if name[: -len(".weight")] in covs and name.endswith(".weight"):
                continue
            sums[name] = sums[name] + state[name] if name in sums else state[name].clone()
        del model, covs
    merged = {}
    with torch.no_grad():
        for name, g in sum_gram.items():
            if torch.linalg.cond(g) > 1e8 or torch.any(torch.diag(g) == 0):
                inv = torch.linalg.pinv(g)
            else:
                inv = torch.inverse(g)
            merged[name + ".weight"] = torch.matmul(inv, sum_gw[name]).transpose(0, 1).contiguous()
        for name, s in sums.items():
            merged[name] = s / len(tasks)
    return {k: v.float().cpu() for k, v in merged.items()}


def skilled(work: Path, tasks: list[str], device: str, dtype: torch.dtype) -> dict:
    """One Gram per distinct input, addmm_ sums, Cholesky solves."""
    groups = {"self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj")}
    sum_gram, sum_gw, sums, rows = {}, {}, {}, {}
    for t in tasks:
        model = load(work, t, device, dtype)
        tied = model.config.tie_word_embeddings
        grams, count = {}, {}
        hooked = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                  and not n.endswith(("k_proj", "v_proj", "up_proj"))
                  and not (tied and n == "lm_head")]

        def hook_for(name):
            def hook(module, inp, _out):
                x = inp[0].reshape(-1, inp[0].shape[-1])
                if name not in grams:
                    grams[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                    count[name] = 0
                grams[name].addmm_(x.T.float(), x.float())
                count[name] += x.shape[0]
            return hook

        mods = dict(model.named_modules())
        handles = [mods[n].register_forward_hook(hook_for(n)) for n in hooked]
        seqs = sequences(work, t)
        with torch.inference_mode():
            for i in range(0, len(seqs), 8):
                model(input_ids=torch.tensor(seqs[i:i + 8], device=device))
        for h in handles:
            h.remove()
        state = model.state_dict()
        if tied:
            state.pop("lm_head.weight", None)  # the embeddings, averaged as such
        linear = set()
        for site, g in grams.items():
            g = g / count[site]
            g_red = RATIO * g + (1 - RATIO) * torch.diag(torch.diag(g))
            sum_gram[site] = sum_gram.get(site, 0) + g_red
            if site == "lm_head":
                members = ["lm_head.weight"]
            else:
                prefix, leaf = site.rsplit(".", 2)[0], ".".join(site.rsplit(".", 2)[1:])
                members = [f"{prefix}.{m}.weight" for m in groups.get(leaf, (leaf,))]
            for name in members:
                linear.add(name)
                w = state[name].float()
                if name not in sum_gw:
                    sum_gw[name] = torch.zeros(w.shape[1], w.shape[0], device=w.device)
                sum_gw[name].addmm_(g_red, w.T)
                rows[name] = site
        for name, v in state.items():
            if name not in linear:
                sums[name] = sums.get(name, 0) + v.float()
        del model, grams
    merged = {}
    for name, gw in sum_gw.items():
        chol = torch.linalg.cholesky(sum_gram[rows[name]])
        merged[name] = torch.cholesky_solve(gw, chol).T.contiguous()
    for name, s in sums.items():
        merged[name] = s / len(tasks)
    return {k: v.cpu() for k, v in merged.items()}


def worst_rel(ours: Path, theirs: dict) -> float:
    """The worst relative difference per tensor (every tensor of both must be in the other)."""
    a = load_file(ours / "model.safetensors")
    assert set(a) == set(theirs), sorted(set(a) ^ set(theirs))
    return max(((a[k].float() - b).abs().max() / b.abs().max()).item()
               for k, b in theirs.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=list(WORKLOADS), default="llama-small")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--impls", default="regmean-gpu,mergebench,skilled",
                    help="comma-separated: regmean-gpu, mergebench, skilled")
    ap.add_argument("--baseline-dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=None, help="default: /tmp/WORKLOAD")
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "regmean-gpu"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w = WORKLOADS[args.workload]
    work = Path(args.work or f"/tmp/{args.workload}")
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    cfg = synthesise(work, args.workload, args.device)
    synth_s = time.perf_counter() - t
    impls = args.impls.split(",")
    unknown = set(impls) - {"regmean-gpu", "mergebench", "skilled"}
    if unknown or "regmean-gpu" not in impls:
        ap.error(f"--impls {args.impls}: regmean-gpu and any of mergebench, skilled")
    tasks, dtype = tasks_of(w), getattr(torch, args.baseline_dtype)
    baselines = {"mergebench": mergebench, "skilled": skilled}
    times = {name: [] for name in impls}
    merged = {}
    for _ in range(args.repeats):
        t = time.perf_counter()
        subprocess.run([args.bin, "--threads", str(args.threads), "-q", "merge", str(cfg),
                        str(work / "out_ours"), "--device", args.device, "--force"], check=True)
        times["regmean-gpu"].append(time.perf_counter() - t)
        for name in [i for i in impls if i != "regmean-gpu"]:
            merged.pop(name, None)
            if args.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            merged[name] = baselines[name](work, tasks, args.device, dtype)
            if args.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "workload": w["label"],
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "baseline_dtype": args.baseline_dtype,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "synthesis_s": synth_s,
        "median_s": med,
        "all_s": times,
    }
    for name, out in merged.items():
        result[f"speedup_vs_{name}"] = med[name] / med["regmean-gpu"]
        result[f"worst_rel_vs_{name}"] = worst_rel(work / "out_ours", out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
