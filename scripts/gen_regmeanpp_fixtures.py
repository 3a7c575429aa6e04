#!/usr/bin/env python3
"""Generate the RegMean++ reference fixtures under ``tests/fixtures/regmeanpp/``.

Run from the repository root, in an environment with FusionBench 0.2.33 (its
RegMean++ code reaches ``model.vision_model``, so it needs transformers 4.x)::

    pip install "transformers<5" torch fusion-bench==0.2.33 safetensors pyyaml
    python scripts/gen_regmeanpp_fixtures.py

Only ``tests/fixtures/regmeanpp/`` is rewritten. The inputs are the tiny pools
that ``scripts/gen_fixtures.py`` made (``tests/fixtures/clip_pool`` and
``tests/fixtures/gpt2_pool``); their loaders, batch selection, Gram hooks and
RegMean formula are imported from that script, so both use one definition.

RegMean++ (FusionBench ``regmean_plusplus``) merges layer by layer: the
embeddings (CLIP: ``embeddings.*`` and ``pre_layrnorm``; GPT-2: ``wte`` and
``wpe``) are the plain mean of the task models; the Grams of layer l are taken
while each task's own layer l runs on the output of the already merged layers
0..l-1 for that task's examples; layer l is then solved as in RegMean.

It writes:

* ``clip/expected/compat_fusionbench.safetensors``: FusionBench's own
  ``RegMeanAlgorithmForCLIPPlusPlus`` run on the CLIP pool, driven as FusionBench
  drives it, except that its data loader does not shuffle (fixed batches in
  file order, so the merge is reproducible). Like FusionBench, it leaves
  ``post_layernorm`` at the base model's value.
* ``clip/expected/{compat,default}_f64.safetensors``: this script's float64
  re-implementation; ``default`` differs from ``compat`` only in averaging
  ``post_layernorm`` (regmean-gpu's default mode).
* ``gpt2/expected/{compat,default}_f64.safetensors``: the float64
  re-implementation for GPT-2 (FusionBench has no GPT-2 RegMean++): compat pads
  every sequence to ``max_length`` and counts padding rows in the Grams, as
  FusionBench's GPT-2 RegMean does; default pads to the longest sequence of a
  batch and excludes padding rows. ``ln_f`` is averaged in both.
* ``{clip,gpt2}/{compat,default}.yaml``: the merge configs (``regmean_plusplus``).
* ``MANIFEST.json``: library versions, file descriptions and the differences
  between the FusionBench and f64 references.

The float64 reference does not call layers one by one: for layer l and task i it
runs the *whole* task model with its embeddings and layers 0..l-1 replaced by the
merged ones and hooks layer l's linear inputs, so every mask, position and
padding rule is transformers' own.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch
import transformers
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_fixtures as gf  # noqa: E402  (the shared pool loaders and RegMean pieces)

ROOT = gf.ROOT
OUT = gf.FIXTURES / "regmeanpp"

CLIP_PARAMS = gf.MergeParams(num_regmean_examples=8, batch_size=4, reduce_non_diagonal_ratio=0.95, fusionbench_compat=True)
GPT2_PARAMS = gf.MergeParams(num_regmean_examples=10, batch_size=4, reduce_non_diagonal_ratio=0.6, fusionbench_compat=True)


# ----------------------------------------------------------------------------
# Model layout: which canonical names are embeddings, layers and the final norm
# ----------------------------------------------------------------------------


class Layout:
    def __init__(self, kind: str, num_layers: int):
        self.kind = kind
        self.num_layers = num_layers

    def layer_prefix(self, l: int) -> str:
        return f"vision_model.encoder.layers.{l}." if self.kind == "clip" else f"h.{l}."

    def is_embedding(self, name: str) -> bool:
        if self.kind == "clip":
            return name.startswith("vision_model.embeddings") or name.startswith("vision_model.pre_layrnorm")
        return name.startswith("wte.") or name.startswith("wpe.")

    def is_final(self, name: str) -> bool:
        return name.startswith("vision_model.post_layernorm" if self.kind == "clip" else "ln_f.")


def with_params(p: gf.MergeParams, compat: bool) -> gf.MergeParams:
    return gf.MergeParams(**{**p.__dict__, "fusionbench_compat": compat})


# ----------------------------------------------------------------------------
# Float64 re-implementation
# ----------------------------------------------------------------------------


def load_canonical(model: nn.Module, pool: gf.Pool, values: dict[str, torch.Tensor]) -> None:
    """Overwrites the model's tensors named (canonically) in `values`."""
    by_canonical = {pool.canonical(k): k for k in model.state_dict()}
    model.load_state_dict({by_canonical[k]: v for k, v in values.items()}, strict=False)


@torch.no_grad()
def regmean_pp_f64(pool: gf.Pool, layout: Layout, p: gf.MergeParams, *, average_final: bool) -> dict[str, torch.Tensor]:
    """The merged float32 state dict (canonical names) of RegMean++ computed in float64."""
    dtype = torch.float64
    tasks = [pool.state(m) for m in pool.tasks]
    base = pool.state(pool.base)
    merged: dict[str, torch.Tensor] = {}

    def mean(name: str) -> torch.Tensor:
        return torch.stack([t[name].to(dtype) for t in tasks]).mean(0)

    for name in tasks[0]:
        if layout.is_embedding(name):
            merged[name] = mean(name)
    hybrids = [copy.deepcopy(m).to(dtype).eval() for m in pool.tasks]
    for l in range(layout.num_layers):
        prefix = layout.layer_prefix(l)
        grams = []
        for task_idx, hybrid in enumerate(hybrids):
            # Embeddings and layers 0..l-1 merged; layer l is the task's own.
            load_canonical(hybrid, pool, merged)
            col = gf.GramCollector(hybrid, pool.linear_types, pool.canonical, running_mean=False)
            for batch in gf.select_batches(pool.num_examples, p):
                inputs, col.row_mask = pool.make_batch(batch, task_idx, p, dtype)
                hybrid(**inputs)
            g, _rows = col.finish()
            grams.append({k: v for k, v in g.items() if k.startswith(prefix)})
        layer_tasks = [{k: v for k, v in t.items() if k.startswith(prefix)} for t in tasks]
        layer = gf.regmean_merge(base, layer_tasks, grams, p, transpose=pool.transpose, fusionbench=False)
        # Excluded names come back with the base value, which the next layers then see.
        merged.update({k: layer[k].to(dtype) for k in layer_tasks[0]})
    for name in tasks[0]:
        if layout.is_final(name) and average_final:
            merged[name] = mean(name)
    out = {k: v.float().contiguous() for k, v in base.items()}
    out.update({k: v.float().contiguous() for k, v in merged.items()})
    return out


# ----------------------------------------------------------------------------
# FusionBench's own class
# ----------------------------------------------------------------------------


def fusionbench_clip(pool: gf.Pool, p: gf.MergeParams) -> dict[str, torch.Tensor]:
    """Runs FusionBench's RegMeanAlgorithmForCLIPPlusPlus on the CLIP pool."""
    import lightning as L
    from bidict import bidict
    from fusion_bench.method.regmean_plusplus import clip_regmean_plusplus as fb
    from fusion_bench.method.regmean_plusplus.regmean_plusplus import RegMeanAlgorithmPlusPlus
    from fusion_bench.modelpool import BaseModelPool

    class FixtureRegMeanPlusPlus(fb.RegMeanAlgorithmForCLIPPlusPlus):
        # FusionBench 0.2.33 declares this mapping as a plain dict, which its own
        # constructor cannot use (it looks up `.inverse`): merge it into the parent's.
        _config_mapping = bidict(RegMeanAlgorithmPlusPlus._config_mapping)
        _config_mapping.update(fb.RegMeanAlgorithmForCLIPPlusPlus._config_mapping)

        def on_regmean_start(self):
            # The zero-shot head (text tower, class names) is for evaluation only.
            pass

    class FixturePool(BaseModelPool):
        def __init__(self, models, datasets):
            super().__init__(models)
            self._fixture_datasets = datasets

        def load_train_dataset(self, name, *args, **kwargs):
            return self._fixture_datasets[name]

    def unshuffled_loader(*args, shuffle=False, **kwargs):
        return torch.utils.data.DataLoader(*args, shuffle=False, **kwargs)

    fb.DataLoader = unshuffled_loader  # fixed batches in file order
    pixels = {name: gf.load_file(str(gf.FIXTURES / "clip_pool" / "data" / f"{name}.safetensors"))["pixel_values"] for name in pool.task_names}
    datasets = {name: [(x, 0) for x in pixels[name]] for name in pool.task_names}
    models = {"_pretrained_": copy.deepcopy(pool.base)}
    models.update({name: copy.deepcopy(m) for name, m in zip(pool.task_names, pool.tasks)})
    algorithm = FixtureRegMeanPlusPlus(
        num_regmean_examples=p.num_regmean_examples,
        exclude_param_names_regex=list(p.exclude_param_names_regex),
        reduce_non_diagonal_ratio=p.reduce_non_diagonal_ratio,
        weight_transpose=True,
        dataloader_kwargs={"batch_size": p.batch_size, "num_workers": 0},
    )
    algorithm._clip_processor = lambda image: image  # the data are pixel values already
    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.launch()
    algorithm.fabric = fabric
    merged = algorithm.run(FixturePool(models, datasets))
    return {pool.canonical(k): v.float().contiguous() for k, v in gf.float_state(merged).items()}


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------


def write_config(path: Path, pool_dir: str, p: gf.MergeParams, task_data: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    gf.write_merge_config(path, p, [(f"../../{pool_dir}/{m[2:]}", f"../../{pool_dir}/{d[2:]}") for m, d in task_data])
    cfg = yaml.safe_load(path.read_text())
    cfg["merge_method"] = "regmean_plusplus"
    cfg["base_model"] = f"../../{pool_dir}/base"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False))


def load_clip_pool() -> gf.Pool:
    """The CLIP pool as `gf.load_clip_pool` gives it, every task loaded by hand: under
    transformers 4.x `from_pretrained` does not read the bare-key layout that 5.x saved."""
    root = gf.FIXTURES / "clip_pool"
    base = gf.CLIPVisionModel.from_pretrained(root / "base", attn_implementation=gf.ATTN, dtype=torch.float32).eval()
    gf.verify_loaded(base, root / "base", gf.canonical_clip)
    tasks = []
    for name in gf.CLIP_TASKS:
        model = gf.CLIPVisionModel(gf.CLIPVisionConfig.from_pretrained(root / name, attn_implementation=gf.ATTN)).eval()
        stored = gf.read_checkpoint(root / name)
        model.load_state_dict({gf.clip_inmemory_name(model, gf.canonical_clip(k)): v for k, v in stored.items()})
        tasks.append(model)
    pixels = [gf.load_file(str(root / "data" / f"{name}.safetensors"))["pixel_values"] for name in gf.CLIP_TASKS]

    def make_batch(batch, task_idx, p, dtype):
        return {"pixel_values": pixels[task_idx][batch].to(dtype)}, None

    return gf.Pool(
        base=base,
        tasks=tasks,
        task_names=gf.CLIP_TASKS,
        linear_types=(nn.Linear,),
        transpose=True,
        canonical=gf.canonical_clip,
        make_batch=make_batch,
        num_examples=pixels[0].shape[0],
    )


def last_layer_diff(layout: Layout, merged: dict[str, torch.Tensor], pool_dir: str) -> dict:
    """How far RegMean++ lies from plain RegMean (gen_fixtures' compat reference) in the last layer."""
    regmean = gf.load_file(str(gf.FIXTURES / pool_dir / "expected" / "compat_f64.safetensors"))
    prefix = layout.layer_prefix(layout.num_layers - 1)
    return gf.max_rel_diff({k: v for k, v in merged.items() if k.startswith(prefix)}, {k: v for k, v in regmean.items() if k.startswith(prefix)})


def configs_and_f64(kind: str, pool: gf.Pool, layout: Layout, params: gf.MergeParams, descriptions: dict[str, str], notes: dict[bool, str]) -> dict:
    """Writes `<kind>/{compat,default}.yaml` and returns their float64 references."""
    ext = "safetensors" if kind == "clip" else "jsonl"
    task_data = [(f"./{t}", f"./data/{t}.{ext}") for t in pool.task_names]
    results = {}
    for mode, compat in [("compat", True), ("default", False)]:
        p = with_params(params, compat)
        write_config(OUT / kind / f"{mode}.yaml", f"{kind}_pool", p, task_data)
        descriptions[f"{kind}/{mode}.yaml"] = (
            f"merge config: regmean_plusplus on {kind}_pool, fusionbench_compat {str(compat).lower()}, "
            f"ratio {p.reduce_non_diagonal_ratio}, {p.num_regmean_examples} examples, batch {p.batch_size}"
        )
        # FusionBench leaves CLIP's post_layernorm at the base value; ln_f has no such rule.
        results[f"{mode}_f64"] = regmean_pp_f64(pool, layout, p, average_final=kind == "gpt2" or not compat)
        note = f" ({notes[compat]})" if notes[compat] else ""
        descriptions[f"{kind}/expected/{mode}_f64.safetensors"] = f"float64 RegMean++ re-implementation of {mode}.yaml{note}"
    return results


def make_clip(descriptions: dict[str, str], stats: dict) -> None:
    root = OUT / "clip"
    pool = load_clip_pool()
    layout = Layout("clip", gf.CLIP_VISION_SHAPE["num_hidden_layers"])
    results = configs_and_f64("clip", pool, layout, CLIP_PARAMS, descriptions, {True: "", False: ""})
    results["compat_fusionbench"] = fusionbench_clip(pool, CLIP_PARAMS)
    for name, tensors in results.items():
        gf.save_tensors(root / "expected" / f"{name}.safetensors", tensors)
    descriptions["clip/expected/compat_fusionbench.safetensors"] = (
        "FusionBench 0.2.33 RegMeanAlgorithmForCLIPPlusPlus on clip_pool (unshuffled loader): full float32 "
        "state dict of the base vision tower after the merge; post_layernorm keeps the base value"
    )
    descriptions["clip/expected/compat_f64.safetensors"] += " (post_layernorm: base value)"
    descriptions["clip/expected/default_f64.safetensors"] += " (post_layernorm: mean of the tasks)"
    stats["clip_fusionbench_vs_f64"] = gf.max_rel_diff(results["compat_fusionbench"], results["compat_f64"])
    stats["clip_regmeanpp_vs_regmean"] = last_layer_diff(layout, results["compat_f64"], "clip_pool")
    base = pool.state(pool.base)
    for k in ("vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"):
        assert torch.equal(results["compat_fusionbench"][k], base[k].float()), f"FusionBench merged {k}"


def make_gpt2(descriptions: dict[str, str], stats: dict) -> None:
    root = OUT / "gpt2"
    pool = gf.load_gpt2_pool(gf.FIXTURES / "gpt2_pool")
    layout = Layout("gpt2", gf.GPT2_SHAPE["n_layer"])
    padding = {
        True: "padded to max_length 24, padding rows counted, 12 examples (whole batches); ln_f averaged",
        False: "padded per batch, padding rows excluded, 10 examples; ln_f averaged",
    }
    results = configs_and_f64("gpt2", pool, layout, GPT2_PARAMS, descriptions, padding)
    for name, tensors in results.items():
        gf.save_tensors(root / "expected" / f"{name}.safetensors", tensors)
    stats["gpt2_compat_vs_default"] = gf.max_rel_diff(results["default_f64"], results["compat_f64"])
    stats["gpt2_regmeanpp_vs_regmean"] = last_layer_diff(layout, results["compat_f64"], "gpt2_pool")


def main() -> None:
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    packages = ("fusion-bench", "torch", "transformers", "safetensors", "pyyaml", "lightning")
    versions = {name: metadata.version(name) for name in packages} | {"python": platform.python_version()}
    print("versions:", json.dumps(versions))
    if OUT.exists():
        gf.shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    descriptions: dict[str, str] = {"MANIFEST.json": "this file"}
    stats: dict = {}
    make_clip(descriptions, stats)
    make_gpt2(descriptions, stats)
    d = stats["clip_fusionbench_vs_f64"]
    print(f"CLIP FusionBench vs f64: worst {d['worst_tensor']} {d['worst_tensor_rel_diff']:.3e}")
    assert d["worst_tensor_rel_diff"] < 1e-4, "FusionBench and the f64 re-implementation disagree"
    for k in ("clip_regmeanpp_vs_regmean", "gpt2_regmeanpp_vs_regmean", "gpt2_compat_vs_default"):
        print(f"{k}: worst {stats[k]['worst_tensor']} {stats[k]['worst_tensor_rel_diff']:.3e}")
        assert stats[k]["worst_tensor_rel_diff"] > 1e-3, f"{k}: the two merges should differ measurably"

    files = {}
    for path in sorted(q for q in OUT.rglob("*") if q.is_file() and q.name != "MANIFEST.json"):
        rel = path.relative_to(OUT).as_posix()
        files[rel] = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "description": descriptions[rel]}
    manifest = {
        "generator": "scripts/gen_regmeanpp_fixtures.py",
        "inputs": "tests/fixtures/clip_pool and tests/fixtures/gpt2_pool (scripts/gen_fixtures.py)",
        "versions": versions,
        "comparisons": stats,
        "files": files,
    }
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(q.stat().st_size for q in OUT.rglob("*") if q.is_file())
    print(f"wrote {OUT.relative_to(ROOT)}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
