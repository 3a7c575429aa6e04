#!/usr/bin/env python3
"""Generate the decoder-LLM test fixtures for regmean-gpu under ``tests/fixtures/llm/``.

Run from the repository root::

    pip install torch "transformers>=4.51,<5" safetensors pyyaml
    python scripts/gen_llm_fixtures.py

The script deletes ``tests/fixtures/llm/`` and rewrites it (nothing else under
``tests/fixtures/``). Everything is tiny, random and deterministic (fixed seeds,
single-threaded CPU torch). It makes:

* ``forward/<arch>/``  for ``llama`` (GQA, untied head, ``llama3`` RoPE scaling),
  ``qwen2`` (q/k/v bias, tied embeddings), ``qwen3`` (q/k RMSNorm, explicit
  head_dim) and ``mistral``: a random model saved by ``save_pretrained``
  (``model/``) and ``expected.safetensors`` with a right-padded token batch
  (``input_ids``, ``attention_mask``, I64), transformers' ``hidden_states.{i}``
  (the embeddings, the output of every layer but the last, then the final norm's
  output), ``logits`` and ``loss`` (the mean next-token loss over the real
  tokens, ``labels`` = the ids with -100 at padding), eager attention, float32;
  ``inputs.jsonl`` holds the same sequences unpadded. The Mistral config is
  rewritten in the transformers 5.x dialect (``rope_parameters``) to test that
  reader; the others keep 4.x's ``rope_theta`` / ``rope_scaling``.
* ``llama_pool/`` and ``qwen2_pool/``  a base model and three task models
  (task_b stored sharded, task_c in bfloat16), token data (``input_ids`` JSON
  Lines), merge configs (``default.yaml``; ``exclude.yaml`` for Llama) and
  ``expected/<config>_f64.safetensors``: RegMean computed here, independently of
  the engine, in float64 — every model run in float64 from its saved weights,
  hooks on every ``nn.Linear`` input, one sequence at a time (so no padding row
  is ever seen: the default mode's semantics), G = Σ XᵀX / rows,
  G' = r·G + (1 − r)·diag(G), W = (Σ G')⁻¹ Σ G' Wᵀ per linear layer (``lm_head``
  included when untied), every other parameter the plain mean, a tied
  ``lm_head`` left tied (the embeddings averaged), excluded parameters the base
  model's. ``regmeanpp.yaml`` and ``expected/regmeanpp_f64.safetensors``:
  RegMean++ on the same pool, also in float64 from the saved weights: the
  embeddings averaged first; for each layer l, every task's Grams taken from a
  hybrid of the merged embeddings and layers 0..l-1 with the task's own layer l
  (and beyond), layer l then solved and averaged as above; ``model.norm``
  averaged; an untied ``lm_head``'s Grams from each task's own final norm over the
  fully merged layers' output.
* ``chat/``  a word-level tokenizer (``tokenizer.json``, its config and chat
  template) with ``data.jsonl`` (``messages`` lines), ``text.jsonl`` (``text``
  lines) and ``expected.json``: the rendered texts, the ids
  ``apply_chat_template(..., tokenize=True)`` gives, and the ids of the texts
  (``tokenizer(text)``, its BOS added).
* ``llama31_8b_config.json``  the config.json of Llama-3.1-8B (shapes only), for
  the memory plan.
* ``MANIFEST.json``  library versions and what each directory holds.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import transformers
import yaml
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "llm"

torch.set_num_threads(1)

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    attn_implementation="eager",
)


def llama_config() -> LlamaConfig:
    # original_max_position_embeddings 100 puts one of the four frequencies in the smoothed
    # band of llama3 scaling, one below it (kept) and two above (divided by the factor).
    return LlamaConfig(
        **{**COMMON, "max_position_embeddings": 128},
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 100,
        },
    )


def qwen2_config() -> Qwen2Config:
    return Qwen2Config(**COMMON, tie_word_embeddings=True, rope_theta=1000000.0)


def qwen3_config() -> Qwen3Config:
    return Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=False, rope_theta=1000000.0)


def mistral_config() -> MistralConfig:
    return MistralConfig(**COMMON, sliding_window=4096, rope_theta=10000.0)


def randomise(model: nn.Module, seed: int) -> None:
    """Weights large enough that every part of the forward pass shows in the hidden states
    (transformers' std-0.02 initialisation leaves them dominated by the embeddings)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def perturb(model: nn.Module, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))


def sequences(seed: int, n: int, lo: int, hi: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        out.append([int(t) for t in torch.randint(3, vocab, (length,), generator=g)])
    return out


def padded(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad, dtype=torch.int64)
    mask = torch.zeros((len(seqs), t), dtype=torch.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def forward_fixture(name: str, config, seed: int) -> None:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    randomise(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    out = ROOT / "forward" / name
    model.save_pretrained(out / "model", safe_serialization=True)
    ids, mask = padded(sequences(seed + 1, 3, 4, 11, config.vocab_size), pad=0)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    tensors = {
        "input_ids": ids,
        "attention_mask": mask,
        "logits": o.logits.contiguous(),
        "loss": o.loss.reshape(1),
    }
    for i, h in enumerate(o.hidden_states):
        tensors[f"hidden_states.{i}"] = h.contiguous()
    save_file(tensors, out / "expected.safetensors", metadata={"format": "pt"})
    with open(out / "inputs.jsonl", "w") as f:
        for row, m in zip(ids.tolist(), mask.tolist()):
            f.write(json.dumps({"input_ids": row[: sum(m)]}) + "\n")


def to_v5_dialect(config_path: Path) -> None:
    """transformers 5 keeps RoPE in `rope_parameters` (theta inside)."""
    c = json.loads(config_path.read_text())
    params = dict(c.pop("rope_scaling", None) or {"rope_type": "default"})
    params["rope_theta"] = c.pop("rope_theta")
    c["rope_parameters"] = params
    config_path.write_text(json.dumps(c, indent=2) + "\n")


def linear_inputs(model: nn.Module, seqs: list[list[int]]) -> tuple[dict, dict]:
    """Σ XᵀX (float64) and row counts of every nn.Linear's input, one sequence at a time."""
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):

            def hook(m, inp, _out, name=name):
                x = inp[0].reshape(-1, inp[0].shape[-1]).to(torch.float64)
                grams[name] = grams.get(name, 0) + x.T @ x
                rows[name] = rows.get(name, 0) + x.shape[0]

            handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for s in seqs:
            model(input_ids=torch.tensor([s]))
    for h in handles:
        h.remove()
    return grams, rows


def regmean_f64(base_dir: Path, task_dirs: list[Path], datas, ratio: float, exclude: list[str]):
    """The merged state dict (float64 → float32), per the module docstring."""
    models = []
    for d in task_dirs:
        m = AutoModelForCausalLM.from_pretrained(
            d, torch_dtype=torch.float32, attn_implementation="eager"
        ).to(torch.float64)
        models.append(m.eval())
    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    tied = base.config.tie_word_embeddings
    reduced = []
    for m, seqs in zip(models, datas):
        g, n = linear_inputs(m, seqs)
        red = {}
        for name, s in g.items():
            gram = s / n[name]
            red[name] = ratio * gram + (1 - ratio) * torch.diag(torch.diag(gram))
        reduced.append(red)
    states = [m.state_dict() for m in models]
    excluded = lambda n: any(re.match(p, n) for p in exclude)  # noqa: E731
    merged = {}
    linear_names = {f"{n}.weight" for n in reduced[0]}
    for key in states[0]:
        if tied and key == "lm_head.weight":
            continue  # tied: stored as the embeddings
        if excluded(key):
            merged[key] = base.state_dict()[key].to(torch.float32).clone()
        elif key in linear_names:
            mod = key[: -len(".weight")]
            gsum = sum(r[mod] for r in reduced)
            gw = sum(r[mod] @ s[key].T for r, s in zip(reduced, states))
            merged[key] = torch.linalg.solve(gsum, gw).T.to(torch.float32).contiguous()
        else:
            merged[key] = (sum(s[key] for s in states) / len(states)).to(torch.float32)
    return merged


def regmeanpp_f64(base_dir: Path, task_dirs: list[Path], datas, ratio: float, exclude: list[str]):
    """RegMean++ in float64, per the module docstring: layer by layer, each task's Grams of
    layer l taken from a hybrid (the merged embeddings and layers 0..l-1, the task's own
    layer l and beyond), one sequence at a time."""
    models = [
        AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager")
        .to(torch.float64)
        .eval()
        for d in task_dirs
    ]
    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    base_state = base.state_dict()
    tied = base.config.tie_word_embeddings
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    excluded = lambda n: any(re.match(p, n) for p in exclude)  # noqa: E731
    merged: dict[str, torch.Tensor] = {}

    def merge_group(keys: list[str], grams: list[dict] | None) -> None:
        for key in keys:
            if excluded(key):
                merged[key] = base_state[key].to(torch.float64).clone()
            elif grams is not None and key.endswith(".weight") and key[: -len(".weight")] in grams[0]:
                mod = key[: -len(".weight")]
                red = [ratio * g[mod] + (1 - ratio) * torch.diag(torch.diag(g[mod])) for g in grams]
                gw = sum(r @ s[key].T for r, s in zip(red, states))
                merged[key] = torch.linalg.solve(sum(red), gw).T.contiguous()
            else:
                merged[key] = sum(s[key] for s in states) / len(states)

    def hybrid_grams(prefix: str) -> list[dict]:
        out = []
        for m, own, seqs in zip(models, states, datas):
            values = {**own, **merged}
            if tied:
                values.pop("lm_head.weight")  # the same tensor as the (merged) embeddings
            m.load_state_dict(values, strict=False)
            g, n = linear_inputs(m, seqs)
            out.append({k: v / n[k] for k, v in g.items() if k.startswith(prefix)})
        return out

    keys = [k for k in states[0] if not (tied and k == "lm_head.weight")]
    merge_group([k for k in keys if k.startswith("model.embed_tokens.")], None)
    for l in range(base.config.num_hidden_layers):
        prefix = f"model.layers.{l}."
        merge_group([k for k in keys if k.startswith(prefix)], hybrid_grams(prefix))
    # lm_head reads each task's own final norm over the merged layers' output: its Grams
    # are taken before the norm is merged.
    head_grams = None if tied else hybrid_grams("lm_head")
    merge_group(["model.norm.weight"], None)
    if not tied:
        merge_group(["lm_head.weight"], head_grams)
    return {k: merged[k].to(torch.float32).contiguous() for k in keys}


def write_jsonl(path: Path, seqs: list[list[int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for s in seqs:
            f.write(json.dumps({"input_ids": s}) + "\n")


def pool_fixture(name: str, config, seed: int, ratio: float, exclude: list[str] | None) -> dict:
    out = ROOT / name
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config).eval()
    randomise(base, seed)
    if config.tie_word_embeddings:
        base.tie_weights()
    base.save_pretrained(out / "base", safe_serialization=True)
    tasks = ["task_a", "task_b", "task_c"]
    datas = []
    for i, t in enumerate(tasks):
        m = AutoModelForCausalLM.from_config(config).eval()
        m.load_state_dict(base.state_dict())
        perturb(m, seed + 10 + i, 0.3)
        if config.tie_word_embeddings:
            m.tie_weights()
        if t == "task_b":
            m.save_pretrained(out / t, safe_serialization=True, max_shard_size="40KB")
        elif t == "task_c":
            m.to(torch.bfloat16).save_pretrained(out / t, safe_serialization=True)
        else:
            m.save_pretrained(out / t, safe_serialization=True)
        seqs = sequences(seed + 20 + i, 10, 8, 20, config.vocab_size)
        write_jsonl(out / "data" / f"{t}.jsonl", seqs)
        datas.append(seqs)
    configs = {"default": []}
    if exclude is not None:
        configs["exclude"] = exclude
    manifest = {}
    for cfg_name, excl in configs.items():
        cfg = {
            "merge_method": "regmean",
            "base_model": "./base",
            "models": [{"model": f"./{t}", "data": f"./data/{t}.jsonl"} for t in tasks],
            "parameters": {
                "num_regmean_examples": 10,
                "batch_size": 4,
                "reduce_non_diagonal_ratio": ratio,
                "exclude_param_names_regex": excl,
                "fusionbench_compat": False,
                "max_length": 64,
                "seed": 0,
                "shuffle": False,
            },
            "out_dtype": "float32",
        }
        (out / f"{cfg_name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        merged = regmean_f64(out / "base", [out / t for t in tasks], datas, ratio, excl)
        (out / "expected").mkdir(exist_ok=True)
        save_file(merged, out / "expected" / f"{cfg_name}_f64.safetensors", {"format": "pt"})
        manifest[cfg_name] = sorted(merged)
    # RegMean++ on the same pool (default mode), against its float64 reference.
    cfg["merge_method"] = "regmean_plusplus"
    cfg["parameters"]["exclude_param_names_regex"] = []
    (out / "regmeanpp.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    merged = regmeanpp_f64(out / "base", [out / t for t in tasks], datas, ratio, [])
    save_file(merged, out / "expected" / "regmeanpp_f64.safetensors", {"format": "pt"})
    plain = regmean_f64(out / "base", [out / t for t in tasks], datas, ratio, [])
    worst = max(((merged[k] - plain[k]).norm() / plain[k].norm()).item() for k in merged)
    assert worst > 1e-3, f"{name}: RegMean++ should differ measurably from RegMean ({worst:.2e})"
    manifest["regmeanpp"] = {"tensors": sorted(merged), "worst_rel_diff_vs_regmean": worst}
    return manifest


LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}\n"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|> system\n"
    "you are a helpful model <|im_end|>\n{% endif %}"
    "<|im_start|> {{ message['role'] }}\n{{ message['content'].strip() }} <|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant\n{% endif %}"
)


def chat_fixture() -> None:
    """A word-level tokenizer (BOS added by its post-processor, as Llama's is) with a
    ChatML-like chat template, `messages` data and the ids `apply_chat_template` gives."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    out = ROOT / "chat"
    specials = ["<s>", "</s>", "[UNK]", "<|im_start|>", "<|im_end|>"]
    words = ("system you are a helpful model user assistant what is the merge of two "
             "models it averages their weights with grams tell me more please yes").split()
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="[UNK]")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    conversations = [
        [{"role": "user", "content": " what is the merge of two models "},
         {"role": "assistant", "content": "it averages their weights with grams"}],
        [{"role": "system", "content": "you are a model"},
         {"role": "user", "content": "tell me more please"},
         {"role": "assistant", "content": "yes"}],
    ]
    ids = [fast.apply_chat_template(c, tokenize=True, add_generation_prompt=False)
           for c in conversations]
    texts = [fast.apply_chat_template(c, tokenize=False) for c in conversations]
    with open(out / "data.jsonl", "w") as f:
        for c in conversations:
            f.write(json.dumps({"messages": c}) + "\n")
    plain = ["what is the merge of two models", "tell me more"]
    with open(out / "text.jsonl", "w") as f:
        for t in plain:
            f.write(json.dumps({"text": t}) + "\n")
    plain_ids = [fast(t)["input_ids"] for t in plain]
    (out / "expected.json").write_text(json.dumps(
        {"input_ids": ids, "text": texts, "text_input_ids": plain_ids}, indent=1))


def main() -> None:
    if ROOT.exists():
        shutil.rmtree(ROOT)
    ROOT.mkdir(parents=True)
    for i, (name, make) in enumerate(
        [("llama", llama_config), ("qwen2", qwen2_config), ("qwen3", qwen3_config),
         ("mistral", mistral_config)]
    ):
        forward_fixture(name, make(), 100 + 10 * i)
    to_v5_dialect(ROOT / "forward" / "mistral" / "model" / "config.json")
    manifest = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "forward": "hidden_states.{i}: embeddings, every layer's output but the last, final norm; logits",
        "pools": {
            "llama_pool": pool_fixture("llama_pool", llama_config(), 300, 0.5,
                                       [r"model\.layers\.1\.mlp\.", r"lm_head"]),
            "qwen2_pool": pool_fixture("qwen2_pool", qwen2_config(), 400, 0.5, None),
        },
    }
    chat_fixture()
    (ROOT / "llama31_8b_config.json").write_text(json.dumps(LLAMA31_8B, indent=2) + "\n")
    (ROOT / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
