#!/usr/bin/env python3
"""PyTorch reference implementations of RegMean for benchmarking `regmean-gpu`.

Usage:
    python benches/pytorch_regmean.py --mode fusionbench|skilled|fusionbench_pp --config CONFIG.yaml \
        --out OUT_DIR --device cpu|cuda [--threads N]

Reads the same YAML config as `regmean-gpu merge` (paths relative to the config file) and
writes OUT_DIR/model.safetensors, OUT_DIR/config.json (copied from the base model) and
OUT_DIR/phases.json (load / forward_and_grams / solve / write / total seconds, peak RSS,
peak device memory).

Modes
-----
fusionbench
    A faithful re-implementation of FusionBench's RegMean (`RegMeanAlgorithm` for
    CLIPVisionModel / GPT2Model): a forward hook on every nn.Linear (CLIP: q, k, v, out_proj,
    fc1, fc2) or HF Conv1D (GPT-2: c_attn, c_proj, c_fc, mlp.c_proj) reads the module *input*,
    ``x = input[0].reshape(-1, d)``, ``xtx = x.T @ x``, and keeps FusionBench's running mean
    (first batch ``G = xtx / rows``, later ``G = (G*n + xtx) / (n + rows)``) in float32.
    Batches are taken in file order; before each batch we stop once
    ``num_regmean_examples`` examples have been seen.  Per model, ``G' = G * (diag(1-r) + r)``
    (FusionBench's ``reduce_non_diagonal_elements``).  Each hooked weight becomes
    ``torch.inverse(sum G'_i) @ sum(G'_i @ W_i^T)`` (transposed back for Linear; Conv1D is
    already [in, out]); every other parameter is the mean over the task models.
    Excluded parameters (``re.match``) keep the base value.

    Deliberate deviation: FusionBench keeps every task model (and all Grams) in memory at once.
    We measure its *algorithm*, not that memory behaviour: each task model is loaded, run,
    folded into running sums (``sum G'_i``, ``sum G'_i W_i^T``, ``sum p_i``) in model order and
    freed.  The sums are formed in the same order as FusionBench's ``sum(list)``; the plain mean
    is ``(sum p_i) / n`` instead of ``torch.stack(...).mean(0)`` (equal up to f32 rounding,
    ~1e-7 relative).

skilled
    What a strong PyTorch user would write: forward in inference mode (under
    ``torch.autocast(float16)`` on CUDA; plain float32 on CPU), one Gram per shared input
    (CLIP: q_proj's input is reused for k_proj and v_proj), Grams accumulated as un-normalised
    sums with ``G.addmm_(x.T, x)`` and divided by the row count at the end (every row counts,
    padding included, as in compat mode), ``sum G'_i W_i^T`` accumulated with ``addmm_`` on the
    concatenated [q;k;v] weights, and the solve done by ``torch.linalg.cholesky_ex`` +
    ``torch.cholesky_solve`` in float32 on the device (falling back to a float64 Cholesky and
    then ``torch.linalg.solve`` if the float32 factorisation fails).

fusionbench_pp
    FusionBench's RegMean++ (``RegMeanAlgorithmForCLIPPlusPlus``, CLIP only), its loop as it
    is: every task model in memory at once; the embeddings (``embeddings.*``,
    ``pre_layrnorm``) averaged and loaded into the base model, which computes every task's
    first-layer inputs (whole batches in file order); then per encoder layer: hooks on its
    nn.Linear modules keep the running-mean Grams while each task's own layer runs on that
    task's inputs, the layer is merged (``torch.inverse(sum G'_i) @ sum(G'_i @ W_i^T)``, the
    rest averaged), loaded into the base model's layer, and that merged layer makes every
    task's next inputs. ``post_layernorm`` keeps the base value. Excluded names
    (``re.match``) are matched against names relative to the layer, as FusionBench does.

Only ``fusionbench_compat: true`` / ``shuffle: false`` semantics are implemented (the
harness always writes such configs); other settings are refused or warned about.
"""

import argparse
import json
import os
import re
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file


# --------------------------------------------------------------------------------------
# config and data
# --------------------------------------------------------------------------------------

DEFAULT_PARAMS = {
    "num_regmean_examples": 256,
    "batch_size": 32,
    "reduce_non_diagonal_ratio": None,
    "exclude_param_names_regex": [],
    "fusionbench_compat": False,
    "max_length": 512,
    "seed": 0,
    "shuffle": True,
}


def load_config(path):
    path = Path(path).resolve()
    with open(path) as f:
        cfg = yaml.safe_load(f)
    if cfg.get("merge_method", "regmean") not in ("regmean", "regmean_plusplus", "regmean++"):
        sys.exit(f"only merge_method: regmean or regmean_plusplus is supported, found {cfg.get('merge_method')}")
    root = path.parent
    params = dict(DEFAULT_PARAMS)
    params.update(cfg.get("parameters") or {})
    if params["shuffle"]:
        sys.exit("shuffle: true is not supported (regmean-gpu's sampler cannot be reproduced); "
                 "use shuffle: false")
    if not params["fusionbench_compat"]:
        warnings.warn("fusionbench_compat is false; this script always uses compat semantics "
                      "(whole batches, padding rows counted)")
    base = (root / cfg["base_model"]).resolve()
    models = [((root / m["model"]).resolve(), (root / m["data"]).resolve()) for m in cfg["models"]]
    return base, models, params, cfg.get("out_dtype")


def read_arch(model_dir):
    with open(Path(model_dir) / "config.json") as f:
        c = json.load(f)
    mt = c.get("model_type")
    if mt in ("clip_vision_model", "clip"):
        return "clip", c
    if mt == "gpt2":
        return "gpt2", c
    sys.exit(f"unsupported model_type {mt!r}")


def n_examples(params, total):
    """Examples used: whole batches in file order until >= num_regmean_examples."""
    bs = params["batch_size"]
    seen = 0
    while seen < params["num_regmean_examples"] and seen < total:
        seen = min(seen + bs, total)
    return seen


def load_batches(arch, data_path, params, model_cfg):
    """List of model-input dicts (CPU tensors), one per batch, in file order."""
    bs = params["batch_size"]
    batches = []
    if arch == "clip":
        with safe_open(str(data_path), "pt") as f:
            sl = f.get_slice("pixel_values")
            total = sl.get_shape()[0]
            n = n_examples(params, total)
            for s in range(0, n, bs):
                px = sl[s:min(s + bs, n)]
                batches.append({"pixel_values": px.to(torch.float32)})
        return batches
    # GPT-2: jsonl with input_ids (optional attention_mask, right padding)
    n_pos = model_cfg.get("n_positions", 1024)
    max_len = min(params["max_length"], n_pos)
    pad = model_cfg.get("pad_token_id")
    if pad is None:
        pad = model_cfg.get("eos_token_id", 50256)
    seqs = []
    with open(data_path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            o = json.loads(line)
            ids = list(o["input_ids"])
            if "attention_mask" in o:
                ids = ids[:sum(o["attention_mask"])]
            seqs.append(ids[:max_len])
    n = n_examples(params, len(seqs))
    for s in range(0, n, bs):
        chunk = seqs[s:min(s + bs, n)]
        ids = torch.full((len(chunk), max_len), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), max_len), dtype=torch.long)
        for i, q in enumerate(chunk):
            ids[i, :len(q)] = torch.tensor(q, dtype=torch.long)
            mask[i, :len(q)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def load_model(arch, model_dir, device):
    if arch == "clip":
        from transformers import CLIPVisionModel as Cls
    else:
        from transformers import GPT2Model as Cls
    m = Cls.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    return m.to(device).eval()


def site_modules(arch, model):
    """name -> module for every hooked layer (nn.Linear for CLIP, Conv1D for GPT-2)."""
    if arch == "clip":
        return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    from transformers.pytorch_utils import Conv1D
    return {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}


def excluded(name, regexes):
    return any(re.match(r, name) for r in regexes)


def file_key(name, base_keys):
    """Checkpoint key of a model parameter name (transformers 5 flattens CLIPVisionModel, so
    its `embeddings.…` parameters are stored as `vision_model.embeddings.…`)."""
    for prefix in ("", "vision_model.", "transformer."):
        if prefix + name in base_keys:
            return prefix + name
    return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------
# FusionBench mode
# --------------------------------------------------------------------------------------

def fb_grams(model, sites, batches, device):
    grams, counts, handles = {}, {}, []

    def make_hook(name):
        def hook(module, inp, out):
            x = inp[0].detach()
            x = x.reshape(-1, x.shape[-1])
            xtx = torch.matmul(x.transpose(0, 1), x)
            if name not in grams:
                grams[name] = xtx / x.shape[0]
                counts[name] = x.shape[0]
            else:
                grams[name] = (grams[name] * counts[name] + xtx) / (counts[name] + x.shape[0])
                counts[name] += x.shape[0]
        return hook

    for name, m in sites.items():
        handles.append(m.register_forward_hook(make_hook(name)))
    with torch.no_grad():
        for b in batches:
            model(**{k: v.to(device) for k, v in b.items()})
    for h in handles:
        h.remove()
    return grams


def reduce_non_diagonal_elements(g, r):
    diag_weights = torch.diag(torch.ones(g.shape[0]) - r).to(g.device)
    non_diag_weights = torch.zeros_like(diag_weights).fill_(r)
    return g * (diag_weights + non_diag_weights)


def load_task(arch, model_dir, data_path, params, device, timers):
    """One task model and its batches, timed as the load phase."""
    t = time.perf_counter()
    model = load_model(arch, model_dir, device)
    with open(Path(model_dir) / "config.json") as f:
        mcfg = json.load(f)
    batches = load_batches(arch, data_path, params, mcfg)
    sync(device)
    timers["load_s"] += time.perf_counter() - t
    return model, batches


def run_fusionbench(arch, models, params, ratio, device, timers, base_keys, also_f64=False):
    regexes = params["exclude_param_names_regex"]
    transpose = arch == "clip"
    sum_g, sum_gw, sum_p = {}, {}, {}
    n = 0
    for model_dir, data_path in models:
        model, batches = load_task(arch, model_dir, data_path, params, device, timers)

        t = time.perf_counter()
        sites = {k: v for k, v in site_modules(arch, model).items()
                 if file_key(k + ".weight", base_keys) is not None
                 and not excluded(file_key(k + ".weight", base_keys), regexes)}
        grams = fb_grams(model, sites, batches, device)
        sync(device)
        timers["forward_and_grams_s"] += time.perf_counter() - t

        t = time.perf_counter()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if file_key(pname, base_keys) is None or excluded(file_key(pname, base_keys), regexes):
                    continue
                mod = pname[:-len(".weight")] if pname.endswith(".weight") else None
                if mod is not None and mod in grams:
                    gp = reduce_non_diagonal_elements(grams[mod], ratio)
                    gw = torch.matmul(gp, p.transpose(0, 1) if transpose else p)
                    sum_g[mod] = gp if mod not in sum_g else sum_g[mod] + gp
                    sum_gw[mod] = gw if mod not in sum_gw else sum_gw[mod] + gw
                else:
                    v = p.detach()
                    sum_p[pname] = v.clone() if pname not in sum_p else sum_p[pname] + v
        n += 1
        del model, grams, batches
        sync(device)
        timers["solve_s"] += time.perf_counter() - t

    t = time.perf_counter()
    merged = {}
    with torch.no_grad():
        for mod in sum_g:
            inv = torch.inverse(sum_g[mod])
            w = torch.matmul(inv, sum_gw[mod])
            merged[mod + ".weight"] = (w.transpose(0, 1) if transpose else w).cpu()
        for pname, s in sum_p.items():
            merged[pname] = (s / n).cpu()
    sync(device)
    timers["solve_s"] += time.perf_counter() - t
    if not also_f64:
        return merged, None
    # Untimed: the same sums solved in float64, the accuracy reference.
    t = time.perf_counter()
    merged64 = dict(merged)
    with torch.no_grad():
        for mod in sum_g:
            w = torch.linalg.solve(sum_g[mod].double(), sum_gw[mod].double()).float()
            merged64[mod + ".weight"] = (w.transpose(0, 1) if transpose else w).cpu()
    timers["untimed_s"] = time.perf_counter() - t
    return merged, merged64


# --------------------------------------------------------------------------------------
# FusionBench RegMean++ mode (CLIP)
# --------------------------------------------------------------------------------------

def vision_tower(model):
    """transformers 4.x nests the tower under `vision_model`; 5.x makes it the model."""
    return model.vision_model if hasattr(model, "vision_model") else model


def encoder_layer_forward(layer, x):
    try:
        out = layer(x, attention_mask=None, causal_attention_mask=None)
    except TypeError:  # transformers 5 dropped the causal mask argument
        out = layer(x, attention_mask=None)
    return out[0] if isinstance(out, tuple) else out


def run_fusionbench_pp(models, params, ratio, device, timers, base_dir):
    regexes = params["exclude_param_names_regex"]
    t = time.perf_counter()
    tasks = [load_task("clip", m, d, params, device, timers) for m, d in models]
    base = load_model("clip", base_dir, device)
    sync(device)
    timers["load_s"] += time.perf_counter() - t

    t = time.perf_counter()
    merged_tower = vision_tower(base)
    with torch.no_grad():
        # 1. embeddings and pre_layrnorm: the plain mean
        for part in ("embeddings", "pre_layrnorm"):
            target = dict(getattr(merged_tower, part).named_parameters())
            states = [dict(getattr(vision_tower(m), part).named_parameters()) for m, _ in tasks]
            for name, p in target.items():
                p.copy_(torch.stack([s[name] for s in states]).mean(0))
        # 1.1 first-layer inputs, from the merged embeddings
        inputs = []
        for _, batches in tasks:
            xs = []
            for b in batches:
                e = merged_tower.embeddings(b["pixel_values"].to(device))
                xs.append(merged_tower.pre_layrnorm(e))
            inputs.append(xs)
        merged_layers = merged_tower.encoder.layers
        task_layers = [vision_tower(m).encoder.layers for m, _ in tasks]
        for l, merged_layer in enumerate(merged_layers):
            names = [n for n, _ in merged_layer.named_parameters() if not excluded(n, regexes)]
            linear = {n for n, m in merged_layer.named_modules() if isinstance(m, torch.nn.Linear)}
            grams = []
            for layers, xs in zip(task_layers, inputs):
                layer = layers[l]
                g, counts, handles = {}, {}, []
                for mod_name, m in layer.named_modules():
                    if mod_name in linear:
                        def hook(module, inp, out, mod_name=mod_name):
                            x = inp[0].detach().reshape(-1, inp[0].shape[-1])
                            xtx = x.T @ x
                            if mod_name not in g:
                                g[mod_name], counts[mod_name] = xtx / x.shape[0], x.shape[0]
                            else:
                                g[mod_name] = (g[mod_name] * counts[mod_name] + xtx) / (counts[mod_name] + x.shape[0])
                                counts[mod_name] += x.shape[0]
                        handles.append(m.register_forward_hook(hook))
                for x in xs:
                    encoder_layer_forward(layer, x)
                for h in handles:
                    h.remove()
                grams.append(g)
            params_l = [dict(layers[l].named_parameters()) for layers in task_layers]
            target = dict(merged_layer.named_parameters())
            for name in names:
                mod = name[:-len(".weight")] if name.endswith(".weight") else None
                if mod in linear:
                    gs = [reduce_non_diagonal_elements(g[mod], ratio) for g in grams]
                    gw = [gp @ p[name].T for gp, p in zip(gs, params_l)]
                    w = torch.inverse(sum(gs)) @ sum(gw)
                    target[name].copy_(w.T)
                else:
                    target[name].copy_(torch.stack([p[name] for p in params_l]).mean(0))
            if l + 1 < len(merged_layers):
                inputs = [[encoder_layer_forward(merged_layer, x) for x in xs] for xs in inputs]
    sync(device)
    timers["forward_and_grams_s"] += time.perf_counter() - t
    merged = {k: v.detach().cpu() for k, v in base.state_dict().items()}
    del tasks
    return merged


# --------------------------------------------------------------------------------------
# skilled mode
# --------------------------------------------------------------------------------------

def skilled_groups(arch, model, regexes, base_keys):
    """group name -> (hooked module, [site module names sharing that input])."""
    sites = site_modules(arch, model)
    groups = {}
    for name, m in sites.items():
        fk = file_key(name + ".weight", base_keys)
        if fk is None or excluded(fk, regexes):
            continue
        if arch == "clip" and name.endswith((".q_proj", ".k_proj", ".v_proj")):
            prefix = name.rsplit(".", 1)[0]
            key = prefix + ".qkv"
            if key not in groups:
                groups[key] = (sites[prefix + ".q_proj"], [])
            groups[key][1].append(name)
        else:
            groups[name] = (m, [name])
    return groups


def skilled_grams(model, groups, batches, device):
    grams, rows, handles = {}, {}, []

    def make_hook(key, d):
        grams[key] = torch.zeros(d, d, device=device, dtype=torch.float32)
        rows[key] = 0

        def hook(module, inp):
            with torch.autocast(device_type=device.type, enabled=False):
                x = inp[0].reshape(-1, inp[0].shape[-1])
                if x.dtype != torch.float32:
                    x = x.float()
                grams[key].addmm_(x.T, x)
            rows[key] += x.shape[0]
        return hook

    for key, (m, _) in groups.items():
        d = m.weight.shape[1] if isinstance(m, torch.nn.Linear) else m.weight.shape[0]
        handles.append(m.register_forward_pre_hook(make_hook(key, d)))
    with torch.inference_mode():
        for b in batches:
            inputs = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            if device.type == "cuda":
                with torch.autocast(device_type="cuda", dtype=torch.float16):
                    model(**inputs)
            else:
                model(**inputs)
    for h in handles:
        h.remove()
    for key in grams:
        grams[key].div_(rows[key])
    return grams


def run_skilled(arch, models, params, ratio, device, timers, base_keys):
    regexes = params["exclude_param_names_regex"]
    transpose = arch == "clip"
    sum_g, sum_gw, sum_p, layout = {}, {}, {}, {}
    n = 0
    for model_dir, data_path in models:
        model, batches = load_task(arch, model_dir, data_path, params, device, timers)

        t = time.perf_counter()
        groups = skilled_groups(arch, model, regexes, base_keys)
        grams = skilled_grams(model, groups, batches, device)
        sync(device)
        timers["forward_and_grams_s"] += time.perf_counter() - t

        t = time.perf_counter()
        with torch.inference_mode():
            mods = dict(model.named_modules())
            in_group = set()
            for key, (_, names) in groups.items():
                g = grams[key]
                diag = g.diagonal().clone()
                g.mul_(ratio)
                g.diagonal().copy_(diag)
                ws = [mods[nm].weight for nm in names]
                # right-hand side [in, sum(out)]
                rhs = torch.cat([w.T for w in ws], 1) if transpose else torch.cat(ws, 1)
                if key not in sum_g:
                    sum_g[key] = g
                    sum_gw[key] = g @ rhs
                    layout[key] = [(nm, w.shape[0] if transpose else w.shape[1]) for nm, w in zip(names, ws)]
                else:
                    sum_g[key].add_(g)
                    sum_gw[key].addmm_(g, rhs)
                in_group.update(nm + ".weight" for nm in names)
            for pname, p in model.named_parameters():
                fk = file_key(pname, base_keys)
                if pname in in_group or fk is None or excluded(fk, regexes):
                    continue
                if pname not in sum_p:
                    sum_p[pname] = p.detach().clone()
                else:
                    sum_p[pname].add_(p)
        n += 1
        del model, grams, batches
        sync(device)
        timers["solve_s"] += time.perf_counter() - t

    t = time.perf_counter()
    merged = {}
    with torch.inference_mode():
        for key, a in sum_g.items():
            b = sum_gw[key]
            L, info = torch.linalg.cholesky_ex(a)
            if int(info) == 0:
                x = torch.cholesky_solve(b, L)
            else:
                L64, info = torch.linalg.cholesky_ex(a.double())
                if int(info) == 0:
                    x = torch.cholesky_solve(b.double(), L64).float()
                else:
                    x = torch.linalg.solve(a.double(), b.double()).float()
            off = 0
            for nm, width in layout[key]:
                part = x[:, off:off + width]
                off += width
                merged[nm + ".weight"] = (part.T if transpose else part).contiguous().cpu()
        for pname, s in sum_p.items():
            merged[pname] = s.div_(n).cpu()
    sync(device)
    timers["solve_s"] += time.perf_counter() - t
    return merged


# --------------------------------------------------------------------------------------

def main():
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["fusionbench", "skilled", "fusionbench_pp"], required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--also-f64", default=None, metavar="DIR",
                    help="fusionbench: also write its sums solved in float64 to DIR (untimed)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    base_dir, models, params, out_dtype = load_config(args.config)
    arch, base_cfg = read_arch(base_dir)
    ratio = params["reduce_non_diagonal_ratio"]
    if ratio is None:
        ratio = 0.95 if arch == "clip" else 0.6
    ratio = float(ratio)

    timers = {"load_s": 0.0, "forward_and_grams_s": 0.0, "solve_s": 0.0, "write_s": 0.0}

    t = time.perf_counter()
    base_file = base_dir / "model.safetensors"
    with safe_open(str(base_file), "pt") as f:
        base_keys = set(f.keys())
    timers["load_s"] += time.perf_counter() - t

    merged64 = None
    if args.mode == "fusionbench_pp":
        if arch != "clip":
            sys.exit("fusionbench_pp: FusionBench's RegMean++ exists for CLIP only")
        merged = run_fusionbench_pp(models, params, ratio, device, timers, base_dir)
    elif args.mode == "skilled":
        merged = run_skilled(arch, models, params, ratio, device, timers, base_keys)
    else:
        merged, merged64 = run_fusionbench(
            arch, models, params, ratio, device, timers, base_keys, also_f64=bool(args.also_f64))

    write_merged(arch, merged, base_dir, base_keys, out_dtype, Path(args.out), timers)
    if merged64 is not None:
        t = time.perf_counter()
        write_merged(arch, merged64, base_dir, base_keys, out_dtype, Path(args.also_f64),
                     {"load_s": 0.0, "write_s": 0.0})
        timers["untimed_s"] += time.perf_counter() - t

    timers["total_s"] = time.perf_counter() - t0
    timers["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    timers["peak_device_bytes"] = (torch.cuda.max_memory_allocated(device)
                                   if device.type == "cuda" else None)
    timers.update({"mode": args.mode, "arch": arch, "device": args.device,
                   "threads": torch.get_num_threads(), "models": len(models),
                   "torch": torch.__version__})
    # The untimed reference is not part of this implementation's time (run_bench.py takes
    # it off the wall time too).
    timers["total_s"] -= timers.get("untimed_s", 0.0)
    out = Path(args.out)
    with open(out / "phases.json", "w") as f:
        json.dump(timers, f, indent=2)
    print(json.dumps(timers))


def write_merged(arch, merged, base_dir, base_keys, out_dtype, out, timers):
    """Loads the merged tensors into the base model and writes its checkpoint to `out`."""
    t = time.perf_counter()
    base = load_model(arch, base_dir, "cpu")
    load_base_s = time.perf_counter() - t
    timers["load_s"] += load_base_s

    t = time.perf_counter()
    missing = base.load_state_dict(merged, strict=False)
    if missing.unexpected_keys:
        sys.exit(f"unexpected merged keys: {missing.unexpected_keys[:5]}")
    dt = {None: None, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}[out_dtype]
    state = {}
    for k, v in base.state_dict().items():
        fk = file_key(k, base_keys)
        if fk is not None:
            v = v.detach()
            if dt is not None:
                v = v.to(dt)
            state[fk] = v.contiguous()
    if set(state) != base_keys:
        sys.exit(f"output keys differ from the base checkpoint: {sorted(base_keys ^ set(state))[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(base_dir / "config.json", out / "config.json")
    timers["write_s"] += time.perf_counter() - t


if __name__ == "__main__":
    main()
