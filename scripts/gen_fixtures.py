#!/usr/bin/env python3
"""Generate the reference test fixtures for regmean-gpu under ``tests/fixtures/``.

Run from the repository root::

    pip install torch transformers safetensors pyyaml
    python scripts/gen_fixtures.py

The script deletes ``tests/fixtures/`` and rewrites it. Everything is tiny,
random and deterministic (fixed seeds, single-threaded CPU torch). It makes:

* ``gpt2_forward/``  a tiny random ``GPT2Model``, five token sequences and the
  hidden states torch computes for them (padded batch, eager attention);
* ``clip_forward/``  a tiny random ``CLIPVisionModel``, a pixel batch and its
  hidden states / pooler output;
* ``gpt2_pool/``     a base ``GPT2Model``, three ``GPT2ForSequenceClassification``
  fine-tunes (one stored in bfloat16), token data, merge configs and the
  RegMean results torch computes for them;
* ``clip_pool/``     a base ``CLIPModel``, three ``CLIPVisionModel`` fine-tunes
  stored in three checkpoint layouts (transformers' own, the other key
  prefix, sharded), pixel data, merge configs and RegMean results;
* ``MANIFEST.json``  library versions, a description of every file, the CLIP
  key layout, Gram row counts, condition numbers and the fusionbench-vs-f64
  differences.

RegMean references come in two precisions: "fusionbench" reproduces
FusionBench's float32 arithmetic exactly (running-mean Gram update,
``torch.inverse``), "f64" does the same maths in float64 with
``torch.linalg.solve``. See ``MANIFEST.json["semantics"]``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import safetensors
import torch
import transformers
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2Model,
)
from transformers.pytorch_utils import Conv1D

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

ATTN = "eager"  # the reference attention; sdpa may differ in the last bits
CLIP_PREFIX = "vision_model."  # canonical prefix of CLIP vision-tower tensor names

# ----------------------------------------------------------------------------
# Model shapes
# ----------------------------------------------------------------------------

GPT2_PAD = 96  # pad = bos = eos = last vocab entry; data ids are drawn from [0, 96)
GPT2_SHAPE = dict(
    vocab_size=97,
    n_positions=32,
    n_embd=45,
    n_layer=2,
    n_head=3,  # head_dim 15
    n_inner=None,  # 4 * n_embd = 180
    pad_token_id=GPT2_PAD,
    bos_token_id=GPT2_PAD,
    eos_token_id=GPT2_PAD,
    # 5x the usual 0.02 so that activations are not tiny and the Grams are
    # not dominated by the LayerNorm biases.
    initializer_range=0.1,
    # Dropout is irrelevant in eval mode; zero makes an accidental train-mode
    # forward still deterministic.
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    resid_pdrop=0.0,
)

CLIP_VISION_SHAPE = dict(
    hidden_size=45,
    intermediate_size=67,
    num_attention_heads=3,
    num_hidden_layers=2,
    image_size=40,
    patch_size=8,  # 5x5 = 25 patches + class token = 26 tokens
    num_channels=3,
    projection_dim=16,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    initializer_range=0.1,
)

CLIP_TEXT_SHAPE = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=16,
    projection_dim=16,
    # The defaults (49406/49407) lie outside the tiny vocabulary.
    pad_token_id=1,
    bos_token_id=97,
    eos_token_id=98,
)

CLIP_TOKENS = (40 // 8) ** 2 + 1


def gpt2_config(**extra) -> GPT2Config:
    return GPT2Config(**GPT2_SHAPE, attn_implementation=ATTN, **extra)


def clip_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(**CLIP_VISION_SHAPE, attn_implementation=ATTN)


# ----------------------------------------------------------------------------
# Bookkeeping: file descriptions and manifest
# ----------------------------------------------------------------------------


@dataclass
class Manifest:
    descriptions: dict[str, str] = field(default_factory=dict)
    data: dict = field(default_factory=dict)

    def describe(self, path: Path, text: str) -> None:
        """Describe a file, or every file below a directory."""
        self.descriptions[path.relative_to(FIXTURES).as_posix()] = text

    def description_of(self, rel: str) -> str:
        if rel in self.descriptions:
            return self.descriptions[rel]
        # Longest registered directory containing the file.
        parents = [d for d in self.descriptions if rel.startswith(d + "/")]
        if not parents:
            raise KeyError(f"no description for fixture file {rel}")
        d = max(parents, key=len)
        return f"{self.descriptions[d]} [{rel[len(d) + 1:]}]"

    def write(self) -> None:
        files = {}
        for path in sorted(p for p in FIXTURES.rglob("*") if p.is_file()):
            rel = path.relative_to(FIXTURES).as_posix()
            files[rel] = {
                "bytes": path.stat().st_size,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "description": self.description_of(rel),
            }
        out = {**self.data, "files": files}
        (FIXTURES / "MANIFEST.json").write_text(json.dumps(out, indent=1) + "\n")


MANIFEST = Manifest()


# ----------------------------------------------------------------------------
# Small utilities
# ----------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone(): safetensors refuses tensors that share storage (e.g. last_hidden_state).
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path))


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, as stored."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        out.update(load_file(str(model_dir / shard)))
    return out


def saved_keys(model_dir: Path) -> list[str]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return list(f.keys())


def float_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict() without non-float buffers (e.g. CLIP's int64 position_ids)."""
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


def canonical_clip(name: str) -> str:
    """CLIP vision-tower names as the fixtures spell them: with `vision_model.`."""
    return name if name.startswith(CLIP_PREFIX) else CLIP_PREFIX + name


def clip_inmemory_name(model: CLIPVisionModel, canonical: str) -> str:
    """Map a canonical name to the name the installed transformers uses in memory."""
    if hasattr(model, "vision_model"):  # transformers 4.x: CLIPVisionModel.vision_model
        return canonical
    return canonical[len(CLIP_PREFIX):]  # transformers 5.x: the tower is the model


# ----------------------------------------------------------------------------
# Random weights
# ----------------------------------------------------------------------------


@torch.no_grad()
def perturb_vectors(model: nn.Module, std: float = 0.05) -> None:
    """Add noise to every 1-D parameter (LayerNorm weights/biases, biases,
    CLIP's class embedding): HF initialises them to exactly 1 or 0, which
    would hide a loader that drops, swaps or mis-assigns them."""
    for p in model.parameters():
        if p.ndim == 1:
            p.add_(torch.randn_like(p) * std)


@torch.no_grad()
def finetune_noise(model: nn.Module, rel: float = 0.3, vec_std: float = 0.02) -> None:
    """Stand-in for fine-tuning: matrices get noise of 0.3x their own std,
    vectors (LayerNorm, biases) 0.02 absolute."""
    for p in model.parameters():
        if p.ndim <= 1:
            p.add_(torch.randn_like(p) * vec_std)
        else:
            p.add_(torch.randn_like(p) * rel * p.std())


def new_gpt2_model(seed: int) -> GPT2Model:
    seed_everything(seed)
    model = GPT2Model(gpt2_config()).eval()
    perturb_vectors(model)
    return model


def new_clip_vision_model(seed: int) -> CLIPVisionModel:
    seed_everything(seed)
    model = CLIPVisionModel(clip_vision_config()).eval()
    perturb_vectors(model)
    return model


# ----------------------------------------------------------------------------
# 1. Forward fixtures
# ----------------------------------------------------------------------------


def pad_right(seqs: list[list[int]], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (and truncate) to `length`; mask 1 on real tokens, 0 on padding."""
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(seqs), length), dtype=torch.int64)
    for row, seq in enumerate(seqs):
        seq = seq[:length]
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
        mask[row, : len(seq)] = 1
    return ids, mask


@torch.no_grad()
def make_gpt2_forward() -> None:
    out = FIXTURES / "gpt2_forward"
    new_gpt2_model(seed=1).save_pretrained(out / "model")
    MANIFEST.describe(out / "model", "tiny random GPT2Model checkpoint (save_pretrained)")

    rng = random.Random(101)
    seqs = [[rng.randrange(GPT2_PAD) for _ in range(n)] for n in (7, 3, 12, 1, 9)]
    write_jsonl(out / "inputs.jsonl", [{"input_ids": s} for s in seqs])
    MANIFEST.describe(out / "inputs.jsonl", "5 token sequences (lengths 7, 3, 12, 1, 9), ids in [0, 96)")

    # Reload from disk so the reference uses exactly what the Rust side reads.
    model = GPT2Model.from_pretrained(out / "model", attn_implementation=ATTN, dtype=torch.float32).eval()
    ids, mask = pad_right(seqs, max(map(len, seqs)), GPT2_PAD)
    res = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    tensors = {"input_ids": ids, "attention_mask": mask, "last_hidden_state": res.last_hidden_state}
    assert len(res.hidden_states) == GPT2_SHAPE["n_layer"] + 1
    for i, h in enumerate(res.hidden_states):
        tensors[f"hidden_states.{i}"] = h
    save_tensors(out / "expected.safetensors", tensors)
    MANIFEST.describe(
        out / "expected.safetensors",
        "input_ids/attention_mask [5,12] int64 (right-padded with 96) and float32 [5,12,45] "
        "hidden_states.0..2 (0 = wte+wpe, 1 = after block 0, 2 = after ln_f = last_hidden_state) "
        "and last_hidden_state, at every position including padding (position_ids = arange, "
        "padded queries attend to the causal non-pad keys)",
    )


@torch.no_grad()
def make_clip_forward() -> dict:
    out = FIXTURES / "clip_forward"
    new_clip_vision_model(seed=2).save_pretrained(out / "model")
    MANIFEST.describe(out / "model", "tiny random CLIPVisionModel checkpoint (save_pretrained)")

    seed_everything(102)
    pixels = torch.randn(3, 3, 40, 40)
    save_tensors(out / "pixel_values.safetensors", {"pixel_values": pixels})
    MANIFEST.describe(out / "pixel_values.safetensors", "pixel_values float32 [3,3,40,40] (randn)")

    model = CLIPVisionModel.from_pretrained(out / "model", attn_implementation=ATTN, dtype=torch.float32).eval()
    res = model(pixel_values=pixels, output_hidden_states=True)
    tensors = {"last_hidden_state": res.last_hidden_state, "pooler_output": res.pooler_output}
    assert len(res.hidden_states) == CLIP_VISION_SHAPE["num_hidden_layers"] + 1
    for i, h in enumerate(res.hidden_states):
        tensors[f"hidden_states.{i}"] = h
    save_tensors(out / "expected.safetensors", tensors)
    MANIFEST.describe(
        out / "expected.safetensors",
        "float32 hidden_states.0..2 [3,26,45] (0 = embeddings after pre_layrnorm, i = after encoder "
        "layer i-1), last_hidden_state [3,26,45] (= hidden_states.2, no post_layernorm) and "
        "pooler_output [3,45] (= post_layernorm(last_hidden_state[:, 0]))",
    )

    keys = saved_keys(out / "model")
    prefixed = all(k.startswith(CLIP_PREFIX) for k in keys)
    assert prefixed or not any(k.startswith(CLIP_PREFIX) for k in keys), "mixed CLIP key layout"
    return {
        "clip_vision_model_saved_prefix": CLIP_PREFIX if prefixed else "",
        "note": (
            f"transformers {transformers.__version__} saves CLIPVisionModel tensors "
            + (f"with the '{CLIP_PREFIX}' prefix" if prefixed else "WITHOUT a prefix (bare 'embeddings.', 'encoder.', ...)")
            + "; a CLIPModel checkpoint stores the tower under 'vision_model.'. Expected merge outputs "
            "always use the 'vision_model.' prefix."
        ),
        "example_saved_keys": keys[:3],
    }


# ----------------------------------------------------------------------------
# 2. RegMean: sample selection, Gram collection, merge
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeParams:
    num_regmean_examples: int
    batch_size: int
    reduce_non_diagonal_ratio: float
    fusionbench_compat: bool
    max_length: int = 24
    exclude_param_names_regex: tuple[str, ...] = ()


def select_batches(num_available: int, p: MergeParams) -> list[list[int]]:
    """Example indices per batch (file order, no shuffle).

    compat: FusionBench stops *before* a batch once >= num examples were seen,
    so whole batches overshoot (10 requested, batch 4 -> 12 used).
    default: exactly the first num examples."""
    if p.fusionbench_compat:
        batches, seen = [], 0
        for start in range(0, num_available, p.batch_size):
            if seen >= p.num_regmean_examples:
                break
            batch = list(range(start, min(start + p.batch_size, num_available)))
            batches.append(batch)
            seen += len(batch)
        return batches
    n = min(p.num_regmean_examples, num_available)
    return [list(range(s, min(s + p.batch_size, n))) for s in range(0, n, p.batch_size)]


class GramCollector:
    """Forward hooks on the input of every linear module, accumulating X^T X.

    running_mean=True is FusionBench's float32 update (G = xtx/rows on the
    first batch, then G = (G*n + xtx)/(n + rows)); False sums X^T X in the
    model's dtype and divides once at the end. `row_mask` (bool, B*T) selects
    which token rows count; None counts every row, padding included.
    """

    def __init__(self, model: nn.Module, linear_types: tuple[type, ...], name_of: Callable[[str], str], running_mean: bool):
        self.running_mean = running_mean
        self.row_mask: torch.Tensor | None = None
        self.grams: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.handles = [
            module.register_forward_hook(self._hook(name_of(name)))
            for name, module in model.named_modules()
            if isinstance(module, linear_types)
        ]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])
            if self.row_mask is not None:
                x = x[self.row_mask]
            xtx = x.T @ x
            rows = x.shape[0]
            if name not in self.grams:
                self.grams[name] = xtx / rows if self.running_mean else xtx
                self.rows[name] = rows
            elif self.running_mean:
                n = self.rows[name]
                self.grams[name] = (self.grams[name] * n + xtx) / (n + rows)
                self.rows[name] = n + rows
            else:
                self.grams[name] = self.grams[name] + xtx
                self.rows[name] += rows

        return hook

    def finish(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        for h in self.handles:
            h.remove()
        grams = self.grams if self.running_mean else {k: g / self.rows[k] for k, g in self.grams.items()}
        return grams, dict(self.rows)


def reduce_non_diagonal(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    mask = torch.full_like(gram, ratio)
    mask.fill_diagonal_(1.0)
    return gram * mask


def regmean_merge(
    base: dict[str, torch.Tensor],
    tasks: list[dict[str, torch.Tensor]],
    grams: list[dict[str, torch.Tensor]],
    p: MergeParams,
    *,
    transpose: bool,
    fusionbench: bool,
) -> dict[str, torch.Tensor]:
    """Merged float32 state dict (canonical names) = base values overwritten
    by the merge of every non-excluded parameter.

    Weights of hooked modules: W = (sum_i G'_i)^-1 sum_i G'_i W_i with W in
    [in, out] orientation (nn.Linear weights are transposed, Conv1D are not).
    Everything else: the plain mean over tasks. Excluded names (re.match on
    any pattern) keep the base value. Writing the merged tensors over the
    base state dict is what `base.load_state_dict(merged, strict=False);
    base.state_dict()` does.
    """
    dtype = torch.float32 if fusionbench else torch.float64
    merged = {}
    for name in tasks[0]:
        if any(re.match(pat, name) for pat in p.exclude_param_names_regex):
            continue
        values = [t[name].to(dtype) for t in tasks]
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in grams[0]:
            gs = [reduce_non_diagonal(g[module], p.reduce_non_diagonal_ratio) for g in grams]
            ws = [w.T if transpose else w for w in values]
            sum_g = sum(gs)
            sum_gw = sum(g @ w for g, w in zip(gs, ws))
            if fusionbench:
                w = torch.inverse(sum_g) @ sum_gw
            else:
                w = torch.linalg.solve(sum_g, sum_gw)
            merged[name] = w.T if transpose else w
        else:
            merged[name] = torch.stack(values).mean(0)
    out = {k: v.float().contiguous() for k, v in base.items()}
    assert set(merged) <= set(out)
    out.update({k: v.float().contiguous() for k, v in merged.items()})
    return out


@dataclass
class Pool:
    """A backbone-level view of a merge pool, independent of the model kind."""

    base: nn.Module
    tasks: list[nn.Module]
    task_names: list[str]
    linear_types: tuple[type, ...]
    transpose: bool  # nn.Linear stores [out, in]; Conv1D stores [in, out]
    canonical: Callable[[str], str]  # in-memory name -> fixture name
    # (example indices, task index, params, dtype) -> (forward kwargs, Gram row mask or None)
    make_batch: Callable[[list[int], int, MergeParams, torch.dtype], tuple[dict, torch.Tensor | None]]
    num_examples: int  # examples per task data file

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {self.canonical(k): v for k, v in float_state(model).items()}


@torch.no_grad()
def collect_grams(pool: Pool, p: MergeParams, *, fusionbench: bool):
    """Per task: Grams and row counts, keyed by canonical module name."""
    dtype = torch.float32 if fusionbench else torch.float64
    grams, rows = [], []
    for task_idx, model in enumerate(pool.tasks):
        model = copy.deepcopy(model).to(dtype).eval()
        col = GramCollector(model, pool.linear_types, pool.canonical, running_mean=fusionbench)
        for batch in select_batches(pool.num_examples, p):
            inputs, col.row_mask = pool.make_batch(batch, task_idx, p, dtype)
            model(**inputs)
        g, r = col.finish()
        grams.append(g)
        rows.append(r)
    return grams, rows


def merge_pool(pool: Pool, p: MergeParams, grams, *, fusionbench: bool) -> dict[str, torch.Tensor]:
    tasks = [pool.state(m) for m in pool.tasks]
    return regmean_merge(pool.state(pool.base), tasks, grams, p, transpose=pool.transpose, fusionbench=fusionbench)


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Per tensor max|a-b| / max|b|: the worst tensor, and the same over all tensors."""
    worst_name, worst = None, 0.0
    num = den = 0.0
    for k in b:
        d = (a[k].double() - b[k].double()).abs().max().item()
        m = b[k].double().abs().max().item()
        num, den = max(num, d), max(den, m)
        if m > 0 and d / m > worst:
            worst_name, worst = k, d / m
    return {"worst_tensor": worst_name, "worst_tensor_rel_diff": worst, "global_max_abs_diff_over_max_abs": num / den}


def gram_conditions(grams: list[dict[str, torch.Tensor]], ratio: float) -> dict[str, float]:
    """2-norm condition number of sum_i G'_i per module."""
    return {
        m: torch.linalg.cond(sum(reduce_non_diagonal(g[m].double(), ratio) for g in grams)).item()
        for m in grams[0]
    }


def write_merge_config(path: Path, p: MergeParams, task_data: list[tuple[str, str]]) -> None:
    cfg = {
        "merge_method": "regmean",
        "base_model": "./base",
        "models": [{"model": m, "data": d} for m, d in task_data],
        "parameters": {
            "num_regmean_examples": p.num_regmean_examples,
            "batch_size": p.batch_size,
            "reduce_non_diagonal_ratio": p.reduce_non_diagonal_ratio,
            "exclude_param_names_regex": list(p.exclude_param_names_regex),
            "fusionbench_compat": p.fusionbench_compat,
            "max_length": p.max_length,
            "seed": 0,
            "shuffle": False,
        },
        "out_dtype": "float32",
    }
    text = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
    assert yaml.safe_load(text) == cfg
    path.write_text(text)


def verify_loaded(model: nn.Module, model_dir: Path, to_file_name: Callable[[str], str]) -> None:
    """The model's float weights equal the checkpoint's tensors upcast to float32."""
    stored = read_checkpoint(model_dir)
    for k, v in float_state(model).items():
        ref = stored[to_file_name(k)].to(torch.float32)
        assert torch.equal(v, ref), f"{model_dir}: {k} differs from the checkpoint"


def run_references(pool: Pool, root: Path, configs: dict[str, MergeParams], expected: list[tuple[str, str]]) -> dict:
    """Write expected/<config>_<precision>.safetensors and return sanity statistics.

    Grams depend only on sample selection, so configs that differ only in
    the exclusion list share them."""
    gram_cache: dict = {}
    results: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    stats: dict = {"row_counts": {}, "gram_condition_numbers": {}, "fusionbench_vs_f64": {}}

    def grams_for(cfg: str, precision: str):
        p = configs[cfg]
        key = (p.num_regmean_examples, p.batch_size, p.fusionbench_compat, p.max_length, precision)
        if key not in gram_cache:
            gram_cache[key] = collect_grams(pool, p, fusionbench=precision == "fusionbench")
        return gram_cache[key]

    for cfg, precision in expected:
        p = configs[cfg]
        grams, rows = grams_for(cfg, precision)
        merged = merge_pool(pool, p, grams, fusionbench=precision == "fusionbench")
        results[(cfg, precision)] = merged
        path = root / "expected" / f"{cfg}_{precision}.safetensors"
        save_tensors(path, merged)
        excl = f", exclude {list(p.exclude_param_names_regex)} (base values)" if p.exclude_param_names_regex else ""
        MANIFEST.describe(
            path,
            f"expected merge of {cfg}.yaml, {precision} reference{excl}: full float32 state dict of the "
            f"base backbone after loading the merged tensors ({len(merged)} tensors)",
        )
        if precision == "f64":
            stats["row_counts"][cfg] = dict(zip(pool.task_names, rows))
            stats["gram_condition_numbers"][cfg] = gram_conditions(grams, p.reduce_non_diagonal_ratio)
        else:
            _, rows64 = grams_for(cfg, "f64")
            assert rows == rows64, "fusionbench and f64 references must see the same rows"

    for cfg, precision in expected:
        if precision == "fusionbench" and (cfg, "f64") in results:
            stats["fusionbench_vs_f64"][cfg] = max_rel_diff(results[(cfg, "fusionbench")], results[(cfg, "f64")])

    # Exclusion sanity: excluded tensors are the base's, everything else is merged.
    for (cfg, _), merged in results.items():
        base = pool.state(pool.base)
        for k, v in merged.items():
            excluded = any(re.match(pat, k) for pat in configs[cfg].exclude_param_names_regex)
            assert torch.equal(v, base[k].float()) == excluded, f"{cfg}: {k} exclusion mismatch"
    return stats


# ----------------------------------------------------------------------------
# 2a. GPT-2 pool
# ----------------------------------------------------------------------------

GPT2_TASKS = {"task_a": 2, "task_b": 3, "task_c": 2}  # name -> num_labels
GPT2_BF16_TASK = "task_c"


def build_gpt2_pool_files(root: Path) -> None:
    base = new_gpt2_model(seed=10)
    base.save_pretrained(root / "base")
    MANIFEST.describe(root / "base", "pretrained base: tiny random GPT2Model (bare keys)")

    for i, (name, num_labels) in enumerate(GPT2_TASKS.items()):
        seed_everything(20 + i)
        model = GPT2ForSequenceClassification(gpt2_config(num_labels=num_labels)).eval()
        model.transformer.load_state_dict(base.state_dict())
        finetune_noise(model.transformer)
        if name == GPT2_BF16_TASK:
            model = model.to(torch.bfloat16)
        model.save_pretrained(root / name)
        dtype = "bfloat16" if name == GPT2_BF16_TASK else "float32"
        MANIFEST.describe(
            root / name,
            f"fine-tune: GPT2ForSequenceClassification ({num_labels} labels, {dtype}); "
            "backbone = base + noise under 'transformer.', random 'score.weight'",
        )

        rng = random.Random(200 + i)
        rows = [
            {
                "input_ids": [rng.randrange(GPT2_PAD) for _ in range(rng.randint(3, 20))],
                "label": rng.randrange(num_labels),
            }
            for _ in range(16)
        ]
        write_jsonl(root / "data" / f"{name}.jsonl", rows)
        MANIFEST.describe(
            root / "data" / f"{name}.jsonl",
            f"16 examples for {name}: input_ids (lengths 3..20, ids in [0,96)) and label",
        )


def load_gpt2_pool(root: Path) -> Pool:
    """Reload everything from disk: references use exactly what the Rust side
    reads (task_c's bfloat16 values upcast exactly to float32)."""
    base = GPT2Model.from_pretrained(root / "base", attn_implementation=ATTN, dtype=torch.float32).eval()
    verify_loaded(base, root / "base", lambda k: k)
    tasks = []
    for name in GPT2_TASKS:
        full = GPT2ForSequenceClassification.from_pretrained(root / name, attn_implementation=ATTN, dtype=torch.float32)
        verify_loaded(full.transformer, root / name, lambda k: "transformer." + k)
        tasks.append(full.transformer.eval())
    data = [read_jsonl(root / "data" / f"{name}.jsonl") for name in GPT2_TASKS]
    pad_ids = [t.config.pad_token_id for t in tasks]  # each task pads with its own config's id (all 96)

    def make_batch(batch, task_idx, p: MergeParams, dtype):
        seqs = [data[task_idx][i]["input_ids"] for i in batch]
        if p.fusionbench_compat:
            # FusionBench pads every sequence to max_length and every row,
            # padding included, enters the Gram.
            ids, mask = pad_right(seqs, p.max_length, pad_ids[task_idx])
            return {"input_ids": ids, "attention_mask": mask}, None
        ids, mask = pad_right(seqs, min(max(map(len, seqs)), p.max_length), pad_ids[task_idx])
        return {"input_ids": ids, "attention_mask": mask}, mask.reshape(-1).bool()

    return Pool(
        base=base,
        tasks=tasks,
        task_names=list(GPT2_TASKS),
        linear_types=(Conv1D,),
        transpose=False,
        canonical=lambda k: k,
        make_batch=make_batch,
        num_examples=len(data[0]),
    )


def make_gpt2_pool() -> dict:
    root = FIXTURES / "gpt2_pool"
    build_gpt2_pool_files(root)

    compat = MergeParams(num_regmean_examples=10, batch_size=4, reduce_non_diagonal_ratio=0.6, fusionbench_compat=True)
    configs = {
        "compat": compat,
        "default": MergeParams(**{**compat.__dict__, "fusionbench_compat": False}),
        "exclude": MergeParams(**{**compat.__dict__, "exclude_param_names_regex": (r".*ln_.*", r"h\.1\.mlp\..*")}),
    }
    task_data = [(f"./{t}", f"./data/{t}.jsonl") for t in GPT2_TASKS]
    for name, p in configs.items():
        write_merge_config(root / f"{name}.yaml", p, task_data)
    MANIFEST.describe(root / "compat.yaml", "merge config: fusionbench_compat true, ratio 0.6, 10 examples (12 used), batch 4, max_length 24")
    MANIFEST.describe(root / "default.yaml", "merge config: as compat.yaml but fusionbench_compat false (10 examples, per-batch padding, padding rows excluded)")
    MANIFEST.describe(root / "exclude.yaml", r"merge config: as compat.yaml plus exclude_param_names_regex ['.*ln_.*', 'h\.1\.mlp\..*']")

    pool = load_gpt2_pool(root)
    expected = [
        ("compat", "fusionbench"),
        ("compat", "f64"),
        ("default", "f64"),
        ("exclude", "fusionbench"),
        ("exclude", "f64"),
    ]
    return run_references(pool, root, configs, expected)


# ----------------------------------------------------------------------------
# 2b. CLIP pool
# ----------------------------------------------------------------------------

CLIP_TASKS = ["task_a", "task_b", "task_c"]
CLIP_SHARD_SIZE = "64KB"  # ~160 KB of float32 weights -> 3 shards


def swap_clip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrite CLIP vision keys into the other layout (add or strip `vision_model.`)."""
    if all(k.startswith(CLIP_PREFIX) for k in tensors):
        return {k[len(CLIP_PREFIX):]: v for k, v in tensors.items()}
    return {CLIP_PREFIX + k: v for k, v in tensors.items()}


def build_clip_pool_files(root: Path) -> None:
    seed_everything(30)
    base = CLIPModel(
        CLIPConfig(
            text_config=CLIP_TEXT_SHAPE,
            vision_config=CLIP_VISION_SHAPE,
            projection_dim=16,
            attn_implementation=ATTN,
        )
    ).eval()
    perturb_vectors(base)
    base.save_pretrained(root / "base")
    MANIFEST.describe(root / "base", "pretrained base: tiny random full CLIPModel (text + vision towers, projections)")

    for i, name in enumerate(CLIP_TASKS):
        seed_everything(40 + i)
        model = CLIPVisionModel(clip_vision_config()).eval()
        model.load_state_dict(base.vision_model.state_dict())
        finetune_noise(model)
        if name == "task_c":
            model.save_pretrained(root / name, max_shard_size=CLIP_SHARD_SIZE)
            assert (root / name / "model.safetensors.index.json").exists(), "task_c must be sharded"
            layout = f"sharded (max_shard_size={CLIP_SHARD_SIZE}, model.safetensors.index.json)"
        else:
            model.save_pretrained(root / name)
            layout = "as transformers saves it"
            if name == "task_b":
                path = root / name / "model.safetensors"
                save_file(swap_clip_prefix(load_file(str(path))), str(path), metadata={"format": "pt"})
                layout = "model.safetensors rewritten with the other key prefix layout"
        MANIFEST.describe(root / name, f"fine-tune: CLIPVisionModel = base vision tower + noise; {layout}")

        seed_everything(300 + i)
        path = root / "data" / f"{name}.safetensors"
        save_tensors(path, {"pixel_values": torch.randn(10, 3, 40, 40)})
        MANIFEST.describe(path, f"pixel_values float32 [10,3,40,40] (randn) for {name}")


def load_clip_pool(root: Path) -> Pool:
    # A CLIPModel checkpoint loads as CLIPVisionModel (vision tower only).
    base = CLIPVisionModel.from_pretrained(root / "base", attn_implementation=ATTN, dtype=torch.float32).eval()
    verify_loaded(base, root / "base", canonical_clip)

    tasks = []
    for name in CLIP_TASKS:
        task_dir = root / name
        if name == "task_b":
            # Stored in the layout transformers would not write: load by hand.
            model = CLIPVisionModel(CLIPVisionConfig.from_pretrained(task_dir, attn_implementation=ATTN)).eval()
            stored = read_checkpoint(task_dir)
            model.load_state_dict({clip_inmemory_name(model, canonical_clip(k)): v for k, v in stored.items()})
        else:
            model = CLIPVisionModel.from_pretrained(task_dir, attn_implementation=ATTN, dtype=torch.float32).eval()
        stored_names = set(read_checkpoint(task_dir))
        verify_loaded(
            model,
            task_dir,
            lambda k: canonical_clip(k) if canonical_clip(k) in stored_names else canonical_clip(k)[len(CLIP_PREFIX):],
        )
        tasks.append(model)
    pixels = [load_file(str(root / "data" / f"{name}.safetensors"))["pixel_values"] for name in CLIP_TASKS]

    def make_batch(batch, task_idx, p: MergeParams, dtype):
        return {"pixel_values": pixels[task_idx][batch].to(dtype)}, None

    return Pool(
        base=base,
        tasks=tasks,
        task_names=CLIP_TASKS,
        linear_types=(nn.Linear,),
        transpose=True,
        canonical=canonical_clip,
        make_batch=make_batch,
        num_examples=pixels[0].shape[0],
    )


def make_clip_pool() -> dict:
    root = FIXTURES / "clip_pool"
    build_clip_pool_files(root)

    compat = MergeParams(num_regmean_examples=8, batch_size=4, reduce_non_diagonal_ratio=0.95, fusionbench_compat=True)
    configs = {"compat": compat, "default": MergeParams(**{**compat.__dict__, "fusionbench_compat": False})}
    task_data = [(f"./{t}", f"./data/{t}.safetensors") for t in CLIP_TASKS]
    for name, p in configs.items():
        write_merge_config(root / f"{name}.yaml", p, task_data)
    MANIFEST.describe(root / "compat.yaml", "merge config: fusionbench_compat true, ratio 0.95, 8 examples, batch 4")
    MANIFEST.describe(
        root / "default.yaml",
        "merge config: as compat.yaml but fusionbench_compat false; no padding and 8 = 2 whole batches, "
        "so its result should match expected/compat_f64.safetensors",
    )

    pool = load_clip_pool(root)
    stats = run_references(pool, root, configs, [("compat", "fusionbench"), ("compat", "f64")])

    # No file for default.yaml: without padding and with whole batches it
    # must reproduce compat_f64 exactly. Check that, and record its rows.
    grams, rows = collect_grams(pool, configs["default"], fusionbench=False)
    default = merge_pool(pool, configs["default"], grams, fusionbench=False)
    compat64 = load_file(str(root / "expected" / "compat_f64.safetensors"))
    assert default.keys() == compat64.keys()
    assert all(torch.equal(default[k], compat64[k]) for k in compat64), "CLIP default != compat f64"
    stats["row_counts"]["default"] = dict(zip(pool.task_names, rows))
    return stats


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------

SEMANTICS = {
    "gram": (
        "Input of every hooked linear module (GPT-2: every Conv1D in GPT2Model; CLIP: every nn.Linear in "
        "CLIPVisionModel), reshaped to [rows, in]. fusionbench: float32 running mean G = xtx/rows on the first "
        "batch, then G = (G*n + xtx)/(n + rows). f64: sum of X^T X over all batches / total rows, in float64."
    ),
    "sample_selection": (
        "File order. compat: batches of batch_size; stop before a batch once >= num_regmean_examples were seen "
        "(gpt2_pool: 12 examples). default: exactly the first num_regmean_examples (gpt2_pool: 10, batches 4,4,2)."
    ),
    "padding": (
        "GPT-2 compat: every sequence right-padded to max_length with config.pad_token_id, attention_mask 0 on "
        "padding, padding rows count in the Gram. default: padded to the longest sequence of the batch, padding "
        "rows excluded from the Gram. position_ids = arange."
    ),
    "reduction": "G' = G * r off the diagonal (r = reduce_non_diagonal_ratio), diagonal unchanged; per model.",
    "merge": (
        "Hooked module weights: W = inverse(sum G') @ sum(G' @ W_i) (fusionbench, float32) or "
        "linalg.solve(sum G', sum G' W_i) (f64), W in [in, out] orientation (nn.Linear transposed, Conv1D as "
        "stored). Other float tensors: mean over tasks. re.match-excluded names keep the base value. The base "
        "model itself is not merged in."
    ),
    "names": (
        "gpt2_pool expected files use GPT2Model names (no 'transformer.' prefix); clip_pool expected files use "
        "'vision_model.'-prefixed names; exclusion regexes are matched against these names."
    ),
}


def main() -> None:
    torch.set_num_threads(1)  # bitwise-reproducible CPU reductions
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "pyyaml": yaml.__version__,
        "python": platform.python_version(),
    }
    print("versions:", json.dumps(versions))

    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    FIXTURES.mkdir(parents=True)

    make_gpt2_forward()
    key_layout = make_clip_forward()
    print("CLIP key layout:", key_layout["note"])
    pools = {"gpt2_pool": make_gpt2_pool(), "clip_pool": make_clip_pool()}

    for pool, stats in pools.items():
        print(f"\n== {pool}")
        for cfg, d in stats["fusionbench_vs_f64"].items():
            print(
                f"  {cfg}: fusionbench vs f64: global max|diff|/max|ref| = {d['global_max_abs_diff_over_max_abs']:.3e}, "
                f"worst tensor {d['worst_tensor']} rel {d['worst_tensor_rel_diff']:.3e}"
            )
            assert d["global_max_abs_diff_over_max_abs"] < 1e-4, "fusionbench and f64 references disagree"
        for cfg, conds in stats["gram_condition_numbers"].items():
            for module, c in conds.items():
                print(f"  {cfg}: cond(sum G') {module} = {c:.3e}")
        for cfg, per_task in stats["row_counts"].items():
            for task, rows in per_task.items():
                print(f"  {cfg}: rows {task}: {sorted(set(rows.values()))} over {len(rows)} modules")

    MANIFEST.describe(FIXTURES / "MANIFEST.json", "this file")
    MANIFEST.data = {
        "generator": "scripts/gen_fixtures.py",
        "versions": versions,
        "attn_implementation": ATTN,
        "key_layout": key_layout,
        "semantics": SEMANTICS,
        **{pool: stats for pool, stats in pools.items()},
    }
    MANIFEST.write()

    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    print(f"\nwrote {FIXTURES.relative_to(ROOT)}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
