#!/usr/bin/env python3
"""The `llama-small` CPU workload: regmean-gpu against RegMean in PyTorch, side by side.

    python benches/llama_small.py [--threads 2] [--repeats 3] [--work /tmp/llama-small]

Synthesises (once, seeded, into ``--work``) a random ``LlamaForCausalLM`` pool: 4 layers,
d 512, ffn 1536, 8 heads / 4 kv heads, vocab 8192, untied head, float32; a base and 4 task
models (the base plus noise), each with 64 sequences of 256 random token ids. Then, at the
same thread count, alternating runs for ``--repeats`` rounds, it times the whole merge
(reading the models, forward passes and Grams, solve, writing) of:

* ``regmean-gpu``: ``regmean-gpu --threads N merge CONFIG OUT --device cpu``;
* ``mergebench``: MergeBench's RegMean as its code does it (``regmean_utils.compute_grams``
  and the merge loop of its RegMean): a forward hook on every ``nn.Linear`` (q, k and v
  each their own), batch 1, the running mean ``G = (G·n + XᵀX)/(n + rows)`` in float32,
  ``reduce_non_diag``, Σ G', Σ G'Wᵀ, then ``torch.linalg.cond`` of Σ G' and
  ``torch.linalg.pinv`` above 1e8 (or a zero diagonal) else ``torch.inverse``; the rest
  averaged. One difference, so that both merge the same set: ``lm_head`` (untied) is
  merged by RegMean here, as regmean-gpu does, where MergeBench's loop skips it;
* ``skilled``: what a careful PyTorch user writes: inference mode, batch 8, one Gram per
  distinct input (q/k/v and gate/up share one) as an un-normalised ``addmm_`` sum,
  ``torch.linalg.cholesky`` + ``cholesky_solve`` in float32.

Every sequence is 256 tokens (no padding), so all three compute the same Grams. Prints one
JSON object: median seconds per implementation, the ratios, and the worst relative
difference per tensor between regmean-gpu's output and each PyTorch one.
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
TASKS = ["task_a", "task_b", "task_c", "task_d"]
EXAMPLES, TOKENS, RATIO = 64, 256, 0.1


def synthesise(work: Path) -> Path:
    cfg_path = work / "llama_small.yaml"
    if cfg_path.exists():
        return cfg_path
    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=False)
    g = torch.Generator().manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    base.save_pretrained(work / "base")
    for i, t in enumerate(TASKS):
        m = LlamaForCausalLM(config).eval()
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.2 * p.abs().mean() * torch.randn(p.shape, generator=g))
        m.save_pretrained(work / t)
        (work / "data").mkdir(exist_ok=True)
        with open(work / "data" / f"{t}.jsonl", "w") as f:
            for _ in range(EXAMPLES):
                ids = torch.randint(0, config.vocab_size, (TOKENS,), generator=g).tolist()
                f.write(json.dumps({"input_ids": ids}) + "\n")
    cfg = {
        "merge_method": "regmean",
        "base_model": "./base",
        "models": [{"model": f"./{t}", "data": f"./data/{t}.jsonl"} for t in TASKS],
        "parameters": {"num_regmean_examples": EXAMPLES, "batch_size": 8,
                       "reduce_non_diagonal_ratio": RATIO, "max_length": TOKENS,
                       "shuffle": False},
        "out_dtype": "float32",
    }
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg_path


def sequences(work: Path, task: str) -> list[list[int]]:
    return [json.loads(line)["input_ids"] for line in open(work / "data" / f"{task}.jsonl")]


def mergebench(work: Path, out: Path) -> None:
    """MergeBench's RegMean, per the module docstring."""
    sum_gram, sum_gw, sums, names = {}, {}, {}, None
    for t in TASKS:
        model = LlamaForCausalLM.from_pretrained(work / t, dtype=torch.float32).eval()
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
                   if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for s in sequences(work, t):
                model(input_ids=torch.tensor([s]))
        for h in handles:
            h.remove()
        state = model.state_dict()
        names = list(state)
        for name, cov in covs.items():
            a = RATIO
            diag_weight = torch.diag(torch.ones(cov.size(0), dtype=cov.dtype) - a)
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
            merged[name] = s / len(TASKS)
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, out / "model.safetensors", {"format": "pt"})


def skilled(work: Path, out: Path) -> None:
    """One Gram per distinct input, addmm_ sums, Cholesky solves."""
    groups = {"self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj")}
    sum_gram, sum_gw, sums, rows = {}, {}, {}, {}
    for t in TASKS:
        model = LlamaForCausalLM.from_pretrained(work / t, dtype=torch.float32).eval()
        grams, count = {}, {}
        hooked = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                  and not n.endswith(("k_proj", "v_proj", "up_proj"))]

        def hook_for(name):
            def hook(module, inp, _out):
                x = inp[0].reshape(-1, inp[0].shape[-1])
                if name not in grams:
                    grams[name] = torch.zeros(x.shape[1], x.shape[1])
                    count[name] = 0
                grams[name].addmm_(x.T, x)
                count[name] += x.shape[0]
            return hook

        mods = dict(model.named_modules())
        handles = [mods[n].register_forward_hook(hook_for(n)) for n in hooked]
        seqs = sequences(work, t)
        with torch.inference_mode():
            for i in range(0, len(seqs), 8):
                model(input_ids=torch.tensor(seqs[i:i + 8]))
        for h in handles:
            h.remove()
        state = model.state_dict()
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
                w = state[name]
                if name not in sum_gw:
                    sum_gw[name] = torch.zeros(w.shape[1], w.shape[0])
                sum_gw[name].addmm_(g_red, w.T)
                rows[name] = site
        for name, v in state.items():
            if name not in linear:
                sums[name] = sums.get(name, 0) + v
        del model, grams
    merged = {}
    for name, gw in sum_gw.items():
        chol = torch.linalg.cholesky(sum_gram[rows[name]])
        merged[name] = torch.cholesky_solve(gw, chol).T.contiguous()
    for name, s in sums.items():
        merged[name] = s / len(TASKS)
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, out / "model.safetensors", {"format": "pt"})


def worst_rel(a_dir: Path, b_dir: Path) -> float:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/llama-small")
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "regmean-gpu"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = synthesise(work)
    times = {"regmean-gpu": [], "mergebench": [], "skilled": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        subprocess.run([args.bin, "--threads", str(args.threads), "-q", "merge", str(cfg),
                        str(work / "out_ours"), "--device", "cpu", "--force"], check=True)
        times["regmean-gpu"].append(time.perf_counter() - t)
        for name, fn in [("mergebench", mergebench), ("skilled", skilled)]:
            t = time.perf_counter()
            fn(work, work / f"out_{name}")
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "workload": "llama-small (4 layers, d 512, ffn 1536, 4 tasks × 64 × 256 tokens)",
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "median_s": med,
        "all_s": times,
        "speedup_vs_mergebench": med["mergebench"] / med["regmean-gpu"],
        "speedup_vs_skilled": med["skilled"] / med["regmean-gpu"],
        "worst_rel_vs_mergebench": worst_rel(work / "out_ours", work / "out_mergebench"),
        "worst_rel_vs_skilled": worst_rel(work / "out_ours", work / "out_skilled"),
    }, indent=1))


if __name__ == "__main__":
    main()
