#!/usr/bin/env python3
"""Generate the fixtures of text tokenisation, image preprocessing and evaluation under
``tests/fixtures/eval/`` (and only there: ``scripts/gen_fixtures.py`` owns the rest).

Run from the repository root::

    pip install torch transformers tokenizers safetensors pillow numpy
    python scripts/gen_eval_fixtures.py

Everything is tiny, random and deterministic. Nothing is downloaded: the tokenizers are
trained here on a small corpus with the ``tokenizers`` library, configured like GPT-2's
(byte-level BPE) and like CLIP's (lowercase, letter/number/punctuation pre-tokenisation,
``</w>`` word suffix, ``<|startoftext|>``/``<|endoftext|>`` around every text), and every
expected value comes from transformers' own classes loading those same files:

* ``tokenizers/``  the two tokenizer.json files, a text corpus (unicode, long lines, every
  accepted pair field name) and the ids transformers produces for it;
* ``images/``      images of many sizes, aspect ratios, formats and modes, and what
  ``CLIPImageProcessor`` (the PIL backend) makes of them before normalisation, with the
  checkpoint's preprocessor_config.json and with the defaults (224);
* ``gpt2/``        a tiny ``GPT2Model`` base and two ``GPT2ForSequenceClassification`` task
  models (2 and 3 labels) with their tokenizer, labelled text data, the same data as token
  ids, and transformers' logits;
* ``clip/``        a tiny ``CLIPModel`` base (text tower, projections, tokenizer,
  preprocessor config) and a ``CLIPVisionModel`` task model, an image folder per task,
  the processor's pixel tensors, class names and templates, and transformers' text
  features, zero-shot heads and logits.
"""

from __future__ import annotations

import json
import platform
import random
import shutil
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2Model,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "eval"
ATTN = "eager"
GPT2_MAX_LENGTH = 24

CORPUS = """\
The quick brown fox jumps over the lazy dog. A movie that is funny, warm and wise.
It's not the best film I've seen, but they'll like it; we'd watch it again.
Satellite imagery of a river, a forest and a highway. A photo of the number 7.
The premise entails the hypothesis? Yes. Does the question answer the sentence? No.
Café naïve résumé — déjà vu. Straße, Übermaß. 東京は大きい都市です。 Ελληνικά κείμενα.
Emoji: 🙂 🚀 and numbers 12345 67890, symbols #@!$%^&*() and tabs\tand  spaces.
A banded texture, a blotchy pattern, a red and white circle 30 kph speed limit sign.
"""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# ----------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------


def train_bpe(tok: Tokenizer, vocab_size: int, specials: list[str], suffix: str = "") -> tuple[dict, list]:
    """A deterministic byte-level BPE trainer (the `tokenizers` trainer breaks ties between
    equally frequent pairs in hash order, so its output changes from run to run): words come
    from the tokenizer's own normaliser and pre-tokeniser; the most frequent pair is merged,
    ties going to the smallest pair."""
    words: dict[tuple[str, ...], int] = {}
    for line in CORPUS.splitlines():
        text = tok.normalizer.normalize_str(line) if tok.normalizer else line
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(text):
            symbols = list(word)
            symbols[-1] += suffix
            words[tuple(symbols)] = words.get(tuple(symbols), 0) + 1
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = specials + alphabet + ([c + suffix for c in alphabet] if suffix else [])
    merges = []
    while len(vocab) < vocab_size:
        counts: dict[tuple[str, str], int] = {}
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + n
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        vocab.append(best[0] + best[1])
        merged = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return {t: i for i, t in enumerate(vocab)}, merges


def train_gpt2_like(path: Path) -> None:
    shape = Tokenizer(models.BPE())
    shape.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocab, merges = train_bpe(shape, 300, ["<|endoftext|>"])
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))


CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def train_clip_like(path: Path) -> None:
    shape = Tokenizer(models.BPE())
    shape.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    shape.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab, merges = train_bpe(shape, 600, specials, suffix="</w>")
    tok = Tokenizer(
        models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token="<|endoftext|>")
    )
    tok.normalizer = shape.normalizer
    tok.pre_tokenizer = shape.pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.RobertaProcessing(
        ("<|endoftext|>", eos), ("<|startoftext|>", bos), trim_offsets=False, add_prefix_space=False
    )
    tok.save(str(path))


def gpt2_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    t = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    t.padding_side = "right"
    return t


def clip_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    t = PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    t.padding_side = "right"
    return t


PAIR_FIELDS = [
    ("text_a", "text_b"),
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
    ("question1", "question2"),
]

LONG = "a very long line that keeps going " * 12


def text_corpus() -> list[dict]:
    singles = [
        "The quick brown fox jumps over the lazy dog.",
        "Café naïve résumé — déjà vu, Straße und Übermaß!",
        "東京は大きい都市です。 Ελληνικά κείμενα και 🙂🚀 emoji.",
        "  leading and trailing spaces   ",
        "tabs\tand\nnewlines\r\nin one line",
        LONG,
        "x",
        "Numbers 1234567890 and symbols #@!$%^&*() <|endoftext|> inside.",
    ]
    rows = [{"text": s, "label": i % 2} for i, s in enumerate(singles)]
    pairs = [
        ("A man is playing a guitar.", "A person plays music."),
        ("Is the café open?", "The café opens at 9 — déjà vu."),
        (LONG, "short hypothesis"),
        ("short premise", LONG + " and even longer " * 5),
        (LONG, LONG),
        ("東京は大きい", "🙂 yes"),
    ]
    for i, (a, b) in enumerate(pairs):
        fa, fb = PAIR_FIELDS[i % len(PAIR_FIELDS)]
        rows.append({fa: a, fb: b, "label": i % 3})
    return rows


def pair_of(row: dict) -> tuple[str, str | None]:
    if "text" in row:
        return row["text"], None
    for fa, fb in PAIR_FIELDS:
        if fa in row:
            return row[fa], row[fb]
    raise KeyError(row)


def make_tokenizers() -> dict:
    out = OUT / "tokenizers"
    out.mkdir(parents=True)
    train_gpt2_like(out / "gpt2_tokenizer.json")
    train_clip_like(out / "clip_tokenizer.json")
    rows = text_corpus()
    write_jsonl(out / "corpus.jsonl", rows)
    tok = gpt2_tokenizer(out / "gpt2_tokenizer.json")
    expected = []
    for r in rows:
        a, b = pair_of(r)
        ids = tok(a, b, truncation=True, max_length=GPT2_MAX_LENGTH)["input_ids"]
        untruncated = tok(a, b)["input_ids"]
        expected.append({"input_ids": ids, "untruncated": untruncated})
    write_jsonl(out / "gpt2_expected.jsonl", expected)
    ctok = clip_tokenizer(out / "clip_tokenizer.json")
    clip_texts = [pair_of(r)[0] for r in rows[:8]] + ["a photo of a Dog.", "A PHOTO OF THE NUMBER: \"7\"."]
    write_jsonl(out / "clip_expected.jsonl", [{"text": t, "input_ids": ctok(t)["input_ids"]} for t in clip_texts])
    return {"gpt2_vocab": tok.backend_tokenizer.get_vocab_size(), "clip_vocab": ctok.backend_tokenizer.get_vocab_size()}


# ----------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------


def synthetic_image(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Smooth colour gradients, a few blobs and some noise: realistic enough for JPEG."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 6.28)]
        img[..., c] = 128 + 100 * np.sin(fx * x / w * 6.28 + ph) * np.cos(fy * y / h * 6.28)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(3, max(w, h) / 3)
        col = rng.uniform(0, 255, 3)
        m = ((x - cx) ** 2 + (y - cy) ** 2) < r * r
        img[m] = col
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def save_image(rng: np.random.Generator, path: Path, w: int, h: int, kind: str) -> None:
    arr = synthetic_image(rng, w, h)
    im = Image.fromarray(arr, "RGB")
    if kind == "rgba":
        alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
        im = Image.fromarray(np.dstack([arr, alpha]), "RGBA")
        im.save(path.with_suffix(".png"))
    elif kind == "gray":
        im.convert("L").save(path.with_suffix(".png"))
    elif kind == "palette":
        im.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(path.with_suffix(".png"))
    elif kind == "jpg":
        im.save(path.with_suffix(".jpg"), quality=90)
    elif kind == "webp":
        im.save(path.with_suffix(".webp"), lossless=True)
    else:
        im.save(path.with_suffix(".png"))


KINDS = ["png", "jpg", "webp", "rgba", "gray", "palette"]


def image_folder(root: Path, classes: list[str], per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 0
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            w, h = int(rng.integers(20, 100)), int(rng.integers(20, 100))
            save_image(rng, root / c / f"img{i}", w, h, KINDS[k % len(KINDS)])
            k += 1


def listed(root: Path) -> list[Path]:
    """ImageFolder order: classes sorted, files sorted within a class."""
    return [f for c in sorted(p for p in root.iterdir() if p.is_dir()) for f in sorted(c.iterdir())]


def processed_u8(processor: CLIPImageProcessorPil, files: list[Path]) -> torch.Tensor:
    """What the processor makes of the files before rescaling and normalisation."""
    images = [Image.open(f) for f in files]
    px = processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
    assert torch.equal(px, px.round())
    return px.to(torch.uint8)


def make_images() -> None:
    out = OUT / "images"
    rng = np.random.default_rng(5)
    (out / "default").mkdir(parents=True)
    # At the default 224: a downscaled (antialiased) JPEG and an upscaled extreme strip. The
    # image folders of the CLIP pool add many more sizes, formats and modes at 32.
    for name, (w, h, kind) in {
        "wide_down.jpg": (451, 300, "jpg"),
        "strip.webp": (260, 40, "webp"),
    }.items():
        save_image(rng, out / "default" / Path(name).stem, w, h, kind)
    files = sorted((out / "default").iterdir())
    save_file(
        {"pixels_u8": processed_u8(CLIPImageProcessorPil(), files).contiguous()},
        str(out / "default_expected.safetensors"),
        metadata={"files": json.dumps([f.name for f in files])},
    )


# ----------------------------------------------------------------------------
# GPT-2 pool
# ----------------------------------------------------------------------------


def finetune_noise(model: torch.nn.Module, rel: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn_like(p) * rel * (p.std() if p.numel() > 1 else 0.02))


def make_gpt2(vocab: int) -> dict:
    out = OUT / "gpt2"
    tok_file = OUT / "tokenizers" / "gpt2_tokenizer.json"
    tok = gpt2_tokenizer(tok_file)
    eos = tok.eos_token_id
    seed_everything(11)
    cfg = GPT2Config(
        vocab_size=vocab, n_positions=64, n_embd=24, n_layer=2, n_head=2,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, attn_implementation=ATTN,
    )
    base = GPT2Model(cfg).eval()
    base.save_pretrained(out / "base")
    shutil.copy(tok_file, out / "base" / "tokenizer.json")
    rows = text_corpus()
    info = {}
    for t, (name, labels) in enumerate([("task_a", 2), ("task_b", 3)]):
        seed_everything(20 + t)
        task_cfg = {k: v for k, v in cfg.to_dict().items() if k not in ("id2label", "label2id")}
        m = GPT2ForSequenceClassification(GPT2Config(**task_cfg, num_labels=labels)).eval()
        m.transformer.load_state_dict(base.state_dict())
        finetune_noise(m.transformer, 0.3)
        with torch.no_grad():
            m.score.weight.normal_(0, 3.0)  # wide margins: a prediction must not hinge on rounding
        m.save_pretrained(out / name)
        shutil.copy(tok_file, out / name / "tokenizer.json")
        data = [dict(r, label=r["label"] % labels) for r in rows]
        write_jsonl(out / f"{name}.jsonl", data)
        enc = [tok(*pair_of(r), truncation=True, max_length=GPT2_MAX_LENGTH)["input_ids"] for r in data]
        write_jsonl(out / f"{name}.ids.jsonl", [{"input_ids": e, "label": r["label"]} for e, r in zip(enc, data)])
        # transformers' predictions: the task model itself, and the base backbone with the task head.
        batch = tok.pad({"input_ids": enc}, return_tensors="pt")
        expected = {}
        with torch.no_grad():
            expected["logits_task"] = m(**batch).logits
            mixed = GPT2ForSequenceClassification(m.config).eval()
            mixed.transformer.load_state_dict(base.state_dict())
            mixed.score.load_state_dict(m.score.state_dict())
            expected["logits_base_backbone"] = mixed(**batch).logits
        for k, v in expected.items():
            top2 = v.topk(2, dim=-1).values
            info[f"{name}.{k}.min_margin"] = float((top2[:, 0] - top2[:, 1]).min())
        save_file({k: v.contiguous() for k, v in expected.items()}, str(out / f"{name}.expected.safetensors"))
    for kind, suffix in [("text", ".jsonl"), ("ids", ".ids.jsonl")]:
        (out / f"merge_{kind}.yaml").write_text(
            "merge_method: regmean\nbase_model: ./base\nmodels:\n"
            + "".join(
                f"  - model: ./{t}\n    data: ./{t}{suffix}\n    eval_data: ./{t}.jsonl\n" for t in ["task_a", "task_b"]
            )
            + f"parameters:\n  num_regmean_examples: 16\n  batch_size: 5\n  max_length: {GPT2_MAX_LENGTH}\n  shuffle: false\n"
        )
    return info


# ----------------------------------------------------------------------------
# CLIP pool
# ----------------------------------------------------------------------------

CLIP_CLASSES = {"task_a": ["cat", "dog", "bird"], "task_b": ["red circle", "blue square"]}
CLIP_TEMPLATES = {"task_a": ["a photo of a {}.", "a blurry photo of the {}!"], "task_b": ["a {} sign."]}


def text_features(model: CLIPModel, enc) -> torch.Tensor:
    out = model.get_text_features(**enc)
    return getattr(out, "pooler_output", out)  # transformers 5 returns a model output


def make_clip(vocab: int) -> dict:
    out = OUT / "clip"
    tok_file = OUT / "tokenizers" / "clip_tokenizer.json"
    ctok = clip_tokenizer(tok_file)
    seed_everything(31)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2,
            max_position_embeddings=40, bos_token_id=ctok.bos_token_id, eos_token_id=ctok.eos_token_id,
            pad_token_id=ctok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2,
            image_size=32, patch_size=8,
        ),
        projection_dim=16,
        attn_implementation=ATTN,
    )
    base = CLIPModel(cfg).eval()
    with torch.no_grad():
        base.logit_scale.fill_(float(np.log(100.0)))  # CLIP's trained value: wide logit margins
    base.save_pretrained(out / "base")
    shutil.copy(tok_file, out / "base" / "tokenizer.json")
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(out / "base")

    seed_everything(32)
    task = CLIPVisionModel(cfg.vision_config).eval()
    task.load_state_dict(base.vision_model.state_dict())
    finetune_noise(task, 0.3)
    task.save_pretrained(out / "task_a")
    processor.save_pretrained(out / "task_a")

    info = {}
    tensors = {}
    for t, (name, classes) in enumerate(CLIP_CLASSES.items()):
        folder = out / f"images_{name}"
        image_folder(folder, classes, per_class=3 if name == "task_a" else 2, seed=40 + t)
        (out / f"{name}.classes.json").write_text(
            json.dumps({"classes": classes, "templates": CLIP_TEMPLATES[name]}, indent=1)
        )
        files = listed(folder)
        images = [Image.open(f) for f in files]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        tensors[f"{name}.pixels_u8"] = processed_u8(processor, files)
        save_file({"pixel_values": pixels.contiguous()}, str(out / f"{name}.pixels.safetensors"))
        with torch.no_grad():
            texts = [tpl.format(c) for c in classes for tpl in CLIP_TEMPLATES[name]]
            enc = ctok(texts, padding=True, return_tensors="pt")
            text_out = base.text_model(**enc)
            tensors[f"{name}.text_pooled"] = text_out.pooler_output
            tensors[f"{name}.text_embeds"] = text_features(base, enc)
            assert torch.allclose(tensors[f"{name}.text_embeds"], base.text_projection(text_out.pooler_output))
            # FusionBench's zero-shot head: per class, normalise, average over templates, normalise.
            head = []
            for c in classes:
                e = text_features(base, ctok([tpl.format(c) for tpl in CLIP_TEMPLATES[name]], padding=True, return_tensors="pt"))
                e = e / e.norm(dim=-1, keepdim=True)
                e = e.mean(0)
                head.append(e / e.norm())
            head = torch.stack(head)
            tensors[f"{name}.head"] = head
            scale = base.logit_scale.exp()
            for tower_name, tower in [("base", base.vision_model), ("task_a", task)]:
                pooled = tower(pixel_values=pixels).pooler_output
                emb = base.visual_projection(pooled)
                emb = emb / emb.norm(dim=-1, keepdim=True)
                logits = scale * emb @ head.T
                tensors[f"{name}.logits_{tower_name}"] = logits
                top2 = logits.topk(2, dim=-1).values
                info[f"{name}.{tower_name}.min_margin"] = float((top2[:, 0] - top2[:, 1]).min())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "expected.safetensors"))
    # The base CLIPModel doubles as the second task model (its vision tower).
    for kind, data in [("folder", "./images_{t}"), ("pixels", "./{t}.pixels.safetensors")]:
        (out / f"merge_{kind}.yaml").write_text(
            "merge_method: regmean\nbase_model: ./base\nmodels:\n"
            + "".join(
                f"  - model: ./{m}\n    name: {t}\n    data: {data.format(t=t)}\n"
                f"    eval_data: ./images_{t}\n    classes: ./{t}.classes.json\n"
                for m, t in [("task_a", "task_a"), ("base", "task_b")]
            )
            + "parameters:\n  num_regmean_examples: 16\n  batch_size: 4\n  shuffle: false\n"
        )
    return info


def main() -> None:
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    manifest = {
        "generator": "scripts/gen_eval_fixtures.py",
        "versions": {
            "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "pillow": Image.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
        },
        "gpt2_max_length": GPT2_MAX_LENGTH,
    }
    manifest["tokenizers"] = make_tokenizers()
    make_images()
    manifest["gpt2"] = make_gpt2(manifest["tokenizers"]["gpt2_vocab"])
    manifest["clip"] = make_clip(manifest["tokenizers"]["clip_vocab"])
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(json.dumps(manifest, indent=1))
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
