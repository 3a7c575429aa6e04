#!/usr/bin/env python3
"""Check that models written by ``regmean-gpu merge`` load cleanly in Hugging Face
transformers and compute the same hidden states as ``regmean-gpu forward``.

For every case below the script

1. merges a committed test pool (``tests/fixtures/{gpt2,clip}_pool``) with the
   CLI into a temporary directory (optionally with a different ``out_dtype``
   and/or ``--out-shard-size``);
2. checks the written safetensors carry the requested dtype (and, for the
   sharded case, that ``model.safetensors.index.json`` exists);
3. loads the directory with ``GPT2Model`` / ``CLIPVisionModel``
   ``.from_pretrained(..., attn_implementation="eager", dtype=torch.float32,
   output_loading_info=True)`` and requires ``missing_keys``,
   ``unexpected_keys`` and ``mismatched_keys`` to be empty (and no
   "missing keys" / "unexpected keys" / "newly initialized" text in the
   loading log);
4. runs ``regmean-gpu forward`` on the same directory over the first 8
   examples of the pool's ``task_a`` data, and the transformers forward on the
   same inputs (for GPT-2 the ``input_ids`` / ``attention_mask`` written by our
   forward, so padding is identical);
5. compares ``max|ours - hf| / max|hf|`` over ``last_hidden_state`` (GPT-2:
   positions with ``attention_mask == 1`` only) and, for CLIP, over
   ``pooler_output``; the worst of these must be within the case tolerance.

Cases: gpt2 compat (f32), gpt2 exclude (f32, sharded 60KB), gpt2 default
(float16 output), clip compat (f32), clip compat (bfloat16 output), and the
decoder LLM pools (``tests/fixtures/llm/{llama,qwen2}_pool``, loaded with
``AutoModelForCausalLM``, its backbone's last hidden state compared): llama
default (f32), llama exclude (bfloat16, sharded 40KB), qwen2 default (f32, tied
embeddings).

Run from the repository root (build the binary first with
``cargo build --release``)::

    .venv/bin/python scripts/check_transformers_load.py [--bin target/release/regmean-gpu]

Prints one line per case (name, worst relative error, PASS/FAIL) and a final
``N passed, M failed`` line; exits 1 if any case failed.
Needs torch, transformers, safetensors, numpy and pyyaml (CPU only).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
import yaml
from safetensors import safe_open
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
EXAMPLES = 8
BAD_LOAD_PHRASES = ("missing keys", "unexpected keys", "newly initialized", "not initialized",
                    "were not used", "mismatched")
ST_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass
class Case:
    name: str
    arch: str  # "gpt2" | "clip" | "causal_lm"
    config: Path
    out_dtype: str | None = None  # None: keep the YAML's value
    shard_size: str | None = None
    tol: float = 1e-4


CASES = [
    Case("gpt2-compat-f32", "gpt2", FIXTURES / "gpt2_pool" / "compat.yaml"),
    Case("gpt2-exclude-f32-sharded", "gpt2", FIXTURES / "gpt2_pool" / "exclude.yaml",
         shard_size="60KB"),
    Case("gpt2-default-f16", "gpt2", FIXTURES / "gpt2_pool" / "default.yaml", out_dtype="float16"),
    Case("clip-compat-f32", "clip", FIXTURES / "clip_pool" / "compat.yaml"),
    Case("clip-compat-bf16", "clip", FIXTURES / "clip_pool" / "compat.yaml", out_dtype="bfloat16"),
    Case("llama-default-f32", "causal_lm", FIXTURES / "llm" / "llama_pool" / "default.yaml"),
    Case("llama-exclude-bf16-sharded", "causal_lm", FIXTURES / "llm" / "llama_pool" / "exclude.yaml",
         out_dtype="bfloat16", shard_size="40KB"),
    Case("qwen2-default-f32-tied", "causal_lm", FIXTURES / "llm" / "qwen2_pool" / "default.yaml"),
]


class CheckError(Exception):
    pass


def run_cli(args: list[str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckError(f"command failed ({proc.returncode}): {' '.join(map(str, args))}\n"
                         f"{proc.stdout}{proc.stderr}")


def write_config(case: Case, tmp: Path) -> Path:
    """The config to merge with: the original, or a copy in ``tmp`` with a different
    ``out_dtype`` and every relative path made absolute (relative to the original)."""
    if case.out_dtype is None:
        return case.config
    base = case.config.parent
    cfg = yaml.safe_load(case.config.read_text())

    def absolute(p: str) -> str:
        return str((base / p).resolve()) if not os.path.isabs(p) else p

    cfg["base_model"] = absolute(cfg["base_model"])
    for m in cfg["models"]:
        m["model"] = absolute(m["model"])
        if "data" in m:
            m["data"] = absolute(m["data"])
    cfg["out_dtype"] = case.out_dtype
    out = tmp / f"{case.config.stem}_{case.out_dtype}.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def task_a_data(case: Case) -> Path:
    cfg = yaml.safe_load(case.config.read_text())
    return (case.config.parent / cfg["models"][0]["data"]).resolve()


def check_files(case: Case, model_dir: Path) -> None:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckError(f"no .safetensors in {model_dir}")
    index = model_dir / "model.safetensors.index.json"
    if case.shard_size is not None:
        if not index.exists():
            raise CheckError(f"sharded output without {index.name}: {[f.name for f in files]}")
        weight_map = json.loads(index.read_text())["weight_map"]
        listed = set(weight_map.values())
        if listed != {f.name for f in files}:
            raise CheckError(f"index lists {sorted(listed)}, directory has {[f.name for f in files]}")
    want = ST_DTYPE[case.out_dtype or yaml.safe_load(case.config.read_text()).get("out_dtype", "float32")]
    wrong = []
    for f in files:
        header_len = int.from_bytes(f.read_bytes()[:8], "little")
        header = json.loads(f.read_bytes()[8:8 + header_len])
        wrong += [f"{k}:{v['dtype']}" for k, v in header.items()
                  if k != "__metadata__" and v["dtype"] != want]
    if wrong:
        raise CheckError(f"tensors not stored as {want}: {wrong[:5]}{' ...' if len(wrong) > 5 else ''}")


def load_hf(case: Case, model_dir: Path):
    cls = {"gpt2": transformers.GPT2Model, "clip": transformers.CLIPVisionModel,
           "causal_lm": transformers.AutoModelForCausalLM}[case.arch]
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    tlogger = logging.getLogger("transformers")
    tlogger.addHandler(handler)
    old_verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            model, info = cls.from_pretrained(
                model_dir, attn_implementation="eager", dtype=torch.float32,
                output_loading_info=True)
    finally:
        tlogger.removeHandler(handler)
        transformers.logging.set_verbosity(old_verbosity)
    problems = {k: sorted(map(str, info.get(k) or [])) for k in
                ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise CheckError(f"loading info not clean: {problems}")
    text = log.getvalue()
    bad = [line for line in text.splitlines() if any(p in line.lower() for p in BAD_LOAD_PHRASES)]
    if bad:
        raise CheckError("loading warnings:\n  " + "\n  ".join(bad))
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise CheckError(f"loaded parameter dtypes {dtypes}, wanted float32")
    return model.eval()


def rel(ours: np.ndarray, hf: np.ndarray) -> float:
    if ours.shape != hf.shape:
        raise CheckError(f"shape mismatch: ours {ours.shape}, hf {hf.shape}")
    denom = float(np.abs(hf).max())
    diff = np.abs(ours.astype(np.float64) - hf.astype(np.float64))
    if not np.all(np.isfinite(diff)):
        return float("inf")
    return float(diff.max()) / (denom if denom > 0 else 1.0)


def run_case(case: Case, binary: Path, tmp: Path) -> tuple[float, str]:
    cfg = write_config(case, tmp)
    model_dir = tmp / "merged"
    cmd = [str(binary), "merge", str(cfg), str(model_dir), "--force", "-q"]
    if case.shard_size:
        cmd += ["--out-shard-size", case.shard_size]
    run_cli(cmd)
    check_files(case, model_dir)
    model = load_hf(case, model_dir)

    data = task_a_data(case)
    ours_path = tmp / "ours.safetensors"
    run_cli([str(binary), "forward", str(model_dir), str(data), "--out", str(ours_path),
             "--examples", str(EXAMPLES), "-q"])
    ours = load_file(str(ours_path))

    details = []
    with torch.no_grad():
        if case.arch in ("gpt2", "causal_lm"):
            ids = torch.from_numpy(ours["input_ids"].astype(np.int64))
            mask = torch.from_numpy(ours["attention_mask"].astype(np.int64))
            if ids.shape[0] != EXAMPLES:
                raise CheckError(f"our forward returned {ids.shape[0]} examples, wanted {EXAMPLES}")
            backbone = model.model if case.arch == "causal_lm" else model
            hf = backbone(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
            keep = mask.numpy().astype(bool)
            if ours["last_hidden_state"].shape != hf.shape:
                raise CheckError(f"last_hidden_state shape: ours {ours['last_hidden_state'].shape}, "
                                 f"hf {hf.shape}")
            e = rel(ours["last_hidden_state"][keep], hf[keep])
            details.append(f"last_hidden_state={e:.3e}")
            worst = e
        else:
            px = load_file(str(data))["pixel_values"][:EXAMPLES]
            out = model(pixel_values=torch.from_numpy(px))
            e1 = rel(ours["last_hidden_state"], out.last_hidden_state.numpy())
            e2 = rel(ours["pooler_output"], out.pooler_output.numpy())
            details.append(f"last_hidden_state={e1:.3e} pooler_output={e2:.3e}")
            worst = max(e1, e2)
    return worst, " ".join(details)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "regmean-gpu"),
                    help="regmean-gpu binary (default: target/release/regmean-gpu)")
    ap.add_argument("-k", default=None, help="only run cases whose name contains this")
    args = ap.parse_args()
    binary = Path(args.bin).resolve()
    if not binary.exists():
        print(f"binary not found: {binary} (run `cargo build --release`)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    transformers.logging.disable_progress_bar()

    passed = failed = 0
    for case in CASES:
        if args.k and args.k not in case.name:
            continue
        with tempfile.TemporaryDirectory(prefix=f"regmean-load-{case.name}-") as tmp:
            try:
                worst, details = run_case(case, binary, Path(tmp))
                ok = worst <= case.tol
                print(f"{case.name:<26} worst_rel={worst:.3e} (tol {case.tol:.0e}) "
                      f"{'PASS' if ok else 'FAIL'}  [{details}]", flush=True)
            except CheckError as err:
                ok = False
                print(f"{case.name:<26} worst_rel=n/a FAIL  {err}", flush=True)
            except Exception:  # noqa: BLE001 -- report and keep going
                ok = False
                print(f"{case.name:<26} worst_rel=n/a FAIL  (exception)\n{traceback.format_exc()}",
                      flush=True)
        passed += ok
        failed += not ok
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
