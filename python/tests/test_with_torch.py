"""Everything that needs torch, transformers and fusion-bench: the FusionBench drop-in
classes against FusionBench 0.2.33's own classes, both driven by the same model pool object
on the repository's tiny pools (compat mode: <= 1e-4 relative per tensor), and
`GramAccumulator` / `solve` on torch tensors against the merge's Gram files and float64.

FusionBench's data loaders shuffle without a seed; here they take the examples in dataset
order (its module's `DataLoader` is patched), and the drop-in is given `shuffle=False`, so
both merge the same examples. Its zero-shot and classifier heads, which only turn the
forward passes into logits nobody reads, are left out of FusionBench's runs.
"""

from __future__ import annotations

import copy
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fusion_bench")

import lightning as L  # noqa: E402
from bidict import bidict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPVisionModel, GPT2ForSequenceClassification, GPT2Model  # noqa: E402

from fusion_bench.method.regmean import clip_regmean as fb_clip  # noqa: E402
from fusion_bench.method.regmean import gpt2_regmean as fb_gpt2  # noqa: E402
from fusion_bench.method.regmean_plusplus import clip_regmean_plusplus as fb_clip_pp  # noqa: E402
from fusion_bench.method.regmean_plusplus.regmean_plusplus import RegMeanAlgorithmPlusPlus  # noqa: E402
from fusion_bench.modelpool import BaseModelPool  # noqa: E402

import regmean_gpu  # noqa: E402
from regmean_gpu import fusionbench as ours  # noqa: E402
from conftest import FIXTURES, run_cli  # noqa: E402

TASKS = ["task_a", "task_b", "task_c"]
TOLERANCE = 1e-4


class FixturePool(BaseModelPool):
    """A pool of in-memory models and datasets; every load is a fresh copy, so that one
    run's merged model (FusionBench merges into the loaded pretrained model) cannot change
    what the next run reads."""

    def __init__(self, models, datasets):
        super().__init__(models)
        self._fixture_datasets = datasets

    def load_model(self, name, *args, **kwargs):
        return copy.deepcopy(super().load_model(name, *args, **kwargs))

    def load_train_dataset(self, name, *args, **kwargs):
        return self._fixture_datasets[name]


def unshuffled(*args, shuffle=False, **kwargs):
    return torch.utils.data.DataLoader(*args, shuffle=False, **kwargs)


def cpu_fabric():
    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.launch()
    return fabric


def rel_errors(got: dict, expected: dict) -> dict:
    assert sorted(got) == sorted(expected)
    errors = {}
    for name, e in expected.items():
        g = got[name].double()
        e = e.double()
        assert g.shape == e.shape, name
        errors[name] = float((g - e).abs().max() / e.abs().max().clamp_min(1e-30))
    return errors


def state(module) -> dict:
    return {k: v.detach().float().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------


def clip_pool() -> FixturePool:
    root = FIXTURES / "clip_pool"
    load = lambda d: CLIPVisionModel.from_pretrained(root / d, dtype=torch.float32).eval()
    models = {"_pretrained_": load("base")}
    models.update({t: load(t) for t in TASKS})
    pixels = {t: load_file(str(root / "data" / f"{t}.safetensors"))["pixel_values"] for t in TASKS}
    # (image, label) pairs, as FusionBench's image datasets give them; the "images" are
    # pixel values already, so the CLIP processor is the identity.
    datasets = {t: [(x, 0) for x in pixels[t]] for t in TASKS}
    return FixturePool(models, datasets)


CLIP_ARGS = dict(
    num_regmean_examples=8,
    exclude_param_names_regex=[],
    reduce_non_diagonal_ratio=0.95,
    weight_transpose=True,
    dataloader_kwargs={"batch_size": 4, "num_workers": 0},
)


class FusionBenchClip(fb_clip.RegMeanAlgorithmForCLIP):
    def on_regmean_start(self):
        pass

    def compute_logits(self, module, batch, task):
        images, _ = batch
        return module(images)[1]


class FusionBenchClipPlusPlus(fb_clip_pp.RegMeanAlgorithmForCLIPPlusPlus):
    # FusionBench 0.2.33 declares this mapping as a plain dict, which its own constructor
    # cannot use: merged into the parent's bidict, as its fixture script does.
    _config_mapping = bidict(RegMeanAlgorithmPlusPlus._config_mapping)
    _config_mapping.update(fb_clip_pp.RegMeanAlgorithmForCLIPPlusPlus._config_mapping)

    def on_regmean_start(self):
        pass


def run_fusionbench(algorithm, pool):
    algorithm._clip_processor = lambda image: image
    algorithm.fabric = cpu_fabric()
    return algorithm.run(pool)


def run_ours(algorithm, pool):
    algorithm._clip_processor = lambda image: image
    return algorithm.run(pool)


@pytest.mark.parametrize(
    "fusionbench_class, our_class, module",
    [
        (FusionBenchClip, ours.RegMeanAlgorithmForCLIP, fb_clip),
        (FusionBenchClipPlusPlus, ours.RegMeanAlgorithmForCLIPPlusPlus, fb_clip_pp),
    ],
    ids=["regmean", "regmean_plusplus"],
)
def test_clip_drop_in_merges_as_fusionbench(fusionbench_class, our_class, module, monkeypatch):
    monkeypatch.setattr(module, "DataLoader", unshuffled)
    pool = clip_pool()
    expected = state(run_fusionbench(fusionbench_class(**CLIP_ARGS), pool))
    merged = run_ours(our_class(**CLIP_ARGS, shuffle=False, device="cpu", quiet=True), pool)
    assert isinstance(merged, CLIPVisionModel)
    errors = rel_errors(state(merged), expected)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{worst}: {errors[worst]:.2e}"
    # The merge did something: it is not the pretrained model.
    base = state(pool.load_model("_pretrained_"))
    assert any((state(merged)[k] - base[k]).abs().max() > 1e-3 for k in base)


def test_the_drop_in_reports_and_honours_the_number_of_examples(monkeypatch):
    pool = clip_pool()
    algorithm = ours.RegMeanAlgorithmForCLIP(**{**CLIP_ARGS, "num_regmean_examples": 5}, shuffle=False,
                                             device="cpu", quiet=True)
    run_ours(algorithm, pool)
    # FusionBench draws whole batches until at least 5 examples were seen: 2 batches of 4.
    assert [m["examples"] for m in algorithm.regmean_gpu_report["models"]] == [8, 8, 8]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"weight_transpose": False}, "weight_transpose"),
        ({"dataloader_kwargs": {"batch_size": 4, "drop_last": True}}, "drop_last"),
        ({"num_regmean_examples": 0}, "num_regmean_examples"),
    ],
)
def test_arguments_that_cannot_be_honoured_are_refused(bad, message):
    algorithm = ours.RegMeanAlgorithmForCLIP(**{**CLIP_ARGS, **bad}, device="cpu", quiet=True)
    with pytest.raises(ValueError, match=message):
        run_ours(algorithm, clip_pool())


# ----------------------------------------------------------------------------------------
# GPT-2
# ----------------------------------------------------------------------------------------


def gpt2_pool(max_length: int = 24) -> FixturePool:
    root = FIXTURES / "gpt2_pool"
    models = {"_pretrained_": GPT2Model.from_pretrained(root / "base", dtype=torch.float32).eval()}
    datasets = {}
    for t in TASKS:
        full = GPT2ForSequenceClassification.from_pretrained(root / t, dtype=torch.float32)
        models[t] = full.transformer.eval()
        pad = full.config.pad_token_id
        rows = []
        for line in (root / "data" / f"{t}.jsonl").read_text().splitlines():
            ids = json.loads(line)["input_ids"][:max_length]
            rows.append({
                # FusionBench's tokenised GLUE sets: padded to max_length, with the mask.
                "input_ids": torch.tensor(ids + [pad] * (max_length - len(ids))),
                "attention_mask": torch.tensor([1] * len(ids) + [0] * (max_length - len(ids))),
            })
        datasets[t] = rows
    return FixturePool(models, datasets)


class FusionBenchGpt2(fb_gpt2.RegMeanAlgorithmForGPT2):
    def on_regmean_start(self):
        pass

    def compute_logits(self, module, batch, task):
        return module(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


GPT2_ARGS = dict(
    num_regmean_examples=10,
    exclude_param_names_regex=[],
    reduce_non_diagonal_ratio=0.6,
    weight_transpose=False,
    cache_dir="unused",
    batch_size=4,
    num_workers=0,
)


@pytest.mark.parametrize("exclude", [[], [r".*ln_.*", r"h\.1\.mlp\..*"]], ids=["all", "exclude"])
def test_gpt2_drop_in_merges_as_fusionbench(exclude, monkeypatch):
    monkeypatch.setattr(fb_gpt2, "DataLoader", unshuffled)
    pool = gpt2_pool()
    args = {**GPT2_ARGS, "exclude_param_names_regex": exclude}
    fusionbench = FusionBenchGpt2(**args)
    fusionbench.fabric = cpu_fabric()
    expected = state(fusionbench.run(pool))
    merged = ours.RegMeanAlgorithmForGPT2(**args, shuffle=False, device="cpu", quiet=True).run(pool)
    assert isinstance(merged, GPT2Model)
    errors = rel_errors(state(merged), expected)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{worst}: {errors[worst]:.2e}"
    if exclude:
        base = state(pool.load_model("_pretrained_"))
        assert torch.equal(state(merged)["ln_f.weight"], base["ln_f.weight"])


def test_gpt2_examples_of_different_lengths_are_refused():
    pool = gpt2_pool()
    pool._fixture_datasets["task_b"] = [
        {k: v[:20] for k, v in row.items()} for row in pool._fixture_datasets["task_b"]
    ]
    with pytest.raises(ValueError, match="regmean-gpu pads every task to one max_length"):
        ours.RegMeanAlgorithmForGPT2(**GPT2_ARGS, shuffle=False, device="cpu", quiet=True).run(pool)


def test_engine_errors_surface_as_regmean_errors():
    pool = gpt2_pool()
    args = {**GPT2_ARGS, "reduce_non_diagonal_ratio": 1.5}
    with pytest.raises(regmean_gpu.RegMeanError, match="reduce_non_diagonal_ratio"):
        ours.RegMeanAlgorithmForGPT2(**args, shuffle=False, device="cpu", quiet=True).run(pool)


# ----------------------------------------------------------------------------------------
# GramAccumulator and solve on torch tensors
# ----------------------------------------------------------------------------------------

GPT2_SITES = {"attn.c_attn": "h.{}.attn.c_attn", "attn.c_proj": "h.{}.attn.c_proj",
              "mlp.c_fc": "h.{}.mlp.c_fc", "mlp.c_proj": "h.{}.mlp.c_proj"}


def test_gram_accumulator_on_torch_tensors_equals_the_merges_grams(cli, tmp_path):
    """The Grams of the CLI's `grams` file (its own forward pass) equal those a
    GramAccumulator makes of transformers' activations for the same examples, padding rows
    masked out (the default mode)."""
    root = FIXTURES / "gpt2_pool"
    grams_file = tmp_path / "task_a.grams.safetensors"
    done = run_cli(cli, "grams", "-q", "--model", root / "task_a", "--data", root / "data" / "task_a.jsonl",
                   "-o", grams_file, "--num-regmean-examples", 10, "--batch-size", 4, "--max-length", 24,
                   "--no-shuffle", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    expected = load_file(str(grams_file))

    full = GPT2ForSequenceClassification.from_pretrained(root / "task_a", dtype=torch.float32).eval()
    model = full.transformer
    pad = full.config.pad_token_id
    accumulators, hooks = {}, []
    current_mask = {}
    for layer in range(model.config.n_layer):
        for module_name, site in GPT2_SITES.items():
            name = site.format(layer)
            acc = accumulators[name] = regmean_gpu.GramAccumulator(model.config.n_embd if module_name != "mlp.c_proj"
                                                                   else model.config.n_inner or 4 * model.config.n_embd)
            module = model.get_submodule(f"h.{layer}.{module_name}")

            def hook(_module, inputs, _output, acc=acc):
                x = inputs[0].detach()
                acc.update(x.reshape(-1, x.shape[-1]), mask=current_mask["rows"])

            hooks.append(module.register_forward_hook(hook))
    lines = [json.loads(l)["input_ids"] for l in (root / "data" / "task_a.jsonl").read_text().splitlines()][:10]
    with torch.no_grad():
        for start in range(0, len(lines), 4):
            batch = lines[start:start + 4]
            width = max(map(len, batch))
            ids = torch.tensor([b + [pad] * (width - len(b)) for b in batch])
            mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch])
            current_mask["rows"] = mask.reshape(-1).bool()
            model(ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    real_tokens = sum(map(len, lines))
    assert sorted(accumulators) == sorted(expected)
    for name, acc in accumulators.items():
        assert acc.rows == real_tokens
        got = torch.from_dlpack(acc.finish())
        e = expected[name]
        err = float((got.double() - e.double()).abs().max() / e.double().abs().max())
        assert err <= TOLERANCE, f"{name}: {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gram_accumulator_reads_strided_rows_and_masks_exactly(dtype):
    torch.manual_seed(0)
    wide = torch.randn(37, 20).to(dtype)
    x = wide[:, 3:19]  # rows 20 apart: read in place
    mask = torch.rand(37) > 0.3
    acc = regmean_gpu.GramAccumulator(16)
    acc.update(x[:30], mask=mask[:30])
    acc.update(x[30:], mask=mask[30:])
    kept = x[mask].double()
    expected = kept.T @ kept / kept.shape[0]
    assert acc.rows == int(mask.sum())
    got = torch.from_dlpack(acc.finish()).double()
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-6


def test_gram_accumulator_fusionbench_mode_is_the_running_mean():
    torch.manual_seed(1)
    batches = [torch.randn(n, 8) for n in (5, 3, 7)]
    acc = regmean_gpu.GramAccumulator(8, fusionbench_compat=True)
    gram, rows = None, 0
    for x in batches:
        acc.update(x)
        xtx = x.T @ x
        gram = xtx / x.shape[0] if gram is None else (gram * rows + xtx) / (rows + x.shape[0])
        rows += x.shape[0]
    got = torch.from_dlpack(acc.finish())
    assert float((got - gram).abs().max() / gram.abs().max()) <= 1e-6
    with pytest.raises(regmean_gpu.RegMeanError, match="mask"):
        acc2 = regmean_gpu.GramAccumulator(8, fusionbench_compat=True)
        acc2.update(batches[0], mask=torch.ones(5, dtype=torch.bool))


def test_gram_accumulator_refuses_what_it_cannot_read():
    acc = regmean_gpu.GramAccumulator(4)
    with pytest.raises(ValueError, match=r"\[rows, 4\]"):
        acc.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="contiguous"):
        acc.update(torch.zeros(4, 3).T)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        acc.update(torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask"):
        acc.update(torch.zeros(3, 4), mask=torch.ones(2, dtype=torch.bool))
    with pytest.raises(TypeError, match="DLPack"):
        acc.update([[0.0] * 4])
    assert acc.rows == 0
    with pytest.raises(regmean_gpu.RegMeanError, match="no rows were accumulated"):
        regmean_gpu.GramAccumulator(4).finish()
    acc.update(torch.ones(1, 4))
    acc.finish()
    with pytest.raises(RuntimeError, match="finished"):
        acc.update(torch.zeros(1, 4))


def test_solve_is_the_closed_form_in_float64():
    torch.manual_seed(2)
    d_in, d_out = 12, 5
    grams = [(lambda a: a.T @ a / 40)(torch.randn(40, d_in)) for _ in range(3)]
    weights = [torch.randn(d_in, d_out) for _ in range(3)]
    gram_sum = sum(grams)
    gw_sum = sum(g @ w for g, w in zip(grams, weights))
    w_mean = sum(weights) / 3
    merged, how = regmean_gpu.solve(gram_sum, gw_sum, w_mean)
    got = torch.from_dlpack(merged)
    expected = torch.linalg.solve(gram_sum.double(), gw_sum.double())
    assert got.shape == (d_in, d_out)
    assert float((got.double() - expected).abs().max() / expected.abs().max()) <= 1e-5
    assert isinstance(how, str) and how
    with pytest.raises(regmean_gpu.RegMeanError, match="symmetric"):
        regmean_gpu.solve(gram_sum + torch.triu(torch.ones(d_in, d_in), 1), gw_sum, w_mean)
