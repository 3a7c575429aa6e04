"""Drop-in replacements of FusionBench 0.2.33's RegMean classes, merged by regmean-gpu.

``RegMeanAlgorithmForCLIP``, ``RegMeanAlgorithmForCLIPPlusPlus`` and
``RegMeanAlgorithmForGPT2`` are subclasses of FusionBench's own classes: they take the same
constructor arguments (so a method YAML whose ``_target_`` names one of them works in the
``fusion_bench`` command line unchanged otherwise), and ``run(modelpool)`` returns the
merged ``nn.Module``, the pool's pretrained model with the merged weights loaded.

They read the pool through FusionBench's own API (``modelpool.load_model``,
``modelpool.load_train_dataset``, the CLIP processor of ``modelpool.load_processor``),
take the examples FusionBench would take (whole batches until at least
``num_regmean_examples`` were seen), preprocess them with FusionBench's own processor, and
write the models and the preprocessed inputs to a temporary pool (safetensors checkpoints,
``pixel_values`` safetensors or token-id JSON Lines) that regmean-gpu merges in
``fusionbench_compat: true`` mode: the Grams, the padding rows and the formula are
FusionBench's, the solve is a float64 Cholesky factorisation instead of ``torch.inverse``.

Differences, all documented in the README: the example order is a seeded shuffle (keyword
``seed``, default 0; ``shuffle=False`` takes the dataset's order) where FusionBench
shuffles without a seed; the merge runs on regmean-gpu's device (keyword ``device``,
default ``auto``; ``precision`` ``float32`` by default, ``float16`` for the GPU's faster
path); FusionBench's zero-shot / classifier heads, which the merge does not use, are not
built.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List

import torch
from bidict import bidict
from safetensors.torch import load_file, save_file
from torch import nn

# CLIPDataset, which FusionBench 0.2.33 uses, is this class under a deprecated name.
from fusion_bench.dataset.image_dataset import ImageClassificationDataset
from fusion_bench.method.regmean import clip_regmean as _fb_clip
from fusion_bench.method.regmean import gpt2_regmean as _fb_gpt2
from fusion_bench.method.regmean_plusplus import clip_regmean_plusplus as _fb_clip_pp
from fusion_bench.method.regmean_plusplus.regmean_plusplus import RegMeanAlgorithmPlusPlus
from fusion_bench.modelpool import BaseModelPool

from . import merge as _merge

__all__ = [
    "RegMeanAlgorithmForCLIP",
    "RegMeanAlgorithmForCLIPPlusPlus",
    "RegMeanAlgorithmForGPT2",
]

# dataloader_kwargs that only change how fast batches are made, not which or what they are.
_LOADER_SPEED_KEYS = {"batch_size", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor"}


class _RegMeanGpu:
    """What the three classes share: the keywords of regmean-gpu, the temporary pool, the
    merge and loading its result."""

    _merge_method = "regmean"
    # nn.Linear stores [out, in], which FusionBench's formula transposes; GPT-2's Conv1D
    # stores [in, out]. regmean-gpu knows the layout: only the matching value is honoured.
    _weight_transpose = True

    def _take_extras(self, device: str, precision: str, seed: int, shuffle: bool, quiet: bool) -> None:
        self.regmean_gpu_device = device
        self.regmean_gpu_precision = precision
        self.regmean_gpu_seed = int(seed)
        self.regmean_gpu_shuffle = bool(shuffle)
        self.regmean_gpu_quiet = bool(quiet)

    # -- the parameters ------------------------------------------------------------------

    def _param(self, name: str, default: Any = None) -> Any:
        value = getattr(self, name, None)
        if value is None and getattr(self, "config", None) is not None:
            value = self.config.get(name, default)
        return default if value is None else value

    def _check_common(self) -> None:
        transpose = self._param("weight_transpose", True)
        if bool(transpose) != self._weight_transpose:
            raise ValueError(
                f"{type(self).__name__}: weight_transpose={transpose} is not honoured: regmean-gpu "
                f"reads the layout from the checkpoint ({self._weight_transpose} is this model's)"
            )
        n = self._param("num_regmean_examples")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{type(self).__name__}: num_regmean_examples must be a positive integer, not {n!r}")

    def _exclude(self) -> List[str]:
        patterns = self._param("exclude_param_names_regex", []) or []
        return [str(p) for p in patterns]

    def _batch_size(self) -> int:
        raise NotImplementedError

    def _num_workers(self) -> int:
        return 0

    # -- the examples ----------------------------------------------------------------------

    def _indices(self, available: int) -> List[int]:
        """The examples FusionBench's loop takes: whole batches until at least
        num_regmean_examples were seen, in a seeded order (or the dataset's)."""
        batch = self._batch_size()
        wanted = math.ceil(int(self._param("num_regmean_examples")) / batch) * batch
        if self.regmean_gpu_shuffle:
            order = torch.randperm(available, generator=torch.Generator().manual_seed(self.regmean_gpu_seed))
        else:
            order = torch.arange(available)
        return order[: min(wanted, available)].tolist()

    def _write_data(self, name: str, dataset, folder: Path) -> Path:
        raise NotImplementedError

    # -- the pool ----------------------------------------------------------------------------

    @staticmethod
    def _save_model(model: nn.Module, folder: Path, what: str) -> None:
        if not hasattr(model, "save_pretrained"):
            raise TypeError(
                f"{what}: a {type(model).__name__} is not a transformers model; regmean-gpu merges "
                "Hugging Face checkpoints (CLIPVisionModel, GPT2Model)"
            )
        model.save_pretrained(folder, safe_serialization=True)

    def _adjust_task_config(self, folder: Path) -> None:
        """Hook: GPT-2 writes the data's pad id into the task's config."""

    def _base_model(self, modelpool: BaseModelPool) -> nn.Module:
        return modelpool.load_model("_pretrained_")

    def run(self, modelpool: BaseModelPool, **kwargs) -> nn.Module:
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        self.modelpool = modelpool
        self._check_common()
        with tempfile.TemporaryDirectory(prefix="regmean-gpu-fusionbench-") as tmp:
            root = Path(tmp)
            base_dir = root / "_pretrained_"
            self._save_model(self._base_model(modelpool), base_dir, "_pretrained_")
            models = []
            for name in modelpool.model_names:
                model_dir = root / "models" / _safe_name(name)
                self._save_model(modelpool.load_model(name), model_dir, name)
                data = self._write_data(name, modelpool.load_train_dataset(name), root / "data")
                self._adjust_task_config(model_dir)
                models.append({"model": str(model_dir), "data": str(data)})
            if not models:
                raise ValueError("the model pool has no models to merge (only special models such as _pretrained_)")
            config = {
                "merge_method": self._merge_method,
                "base_model": str(base_dir),
                "models": models,
                "parameters": self._parameters(),
                "out_dtype": "float32",
            }
            out = root / "merged"
            self.regmean_gpu_report = _merge(
                config,
                out,
                device=self.regmean_gpu_device,
                quiet=self.regmean_gpu_quiet,
                out_shard_size=1 << 62,
            )
            merged = load_file(str(out / "model.safetensors"))
        merged_model = self._base_model(modelpool)
        _load_merged(merged_model, merged)
        return merged_model

    def _parameters(self) -> Dict[str, Any]:
        return {
            "num_regmean_examples": int(self._param("num_regmean_examples")),
            "batch_size": self._batch_size(),
            "reduce_non_diagonal_ratio": float(self._param("reduce_non_diagonal_ratio")),
            "exclude_param_names_regex": self._exclude(),
            "fusionbench_compat": True,
            # The examples were chosen and ordered here, as FusionBench would take them.
            "shuffle": False,
            "precision": self.regmean_gpu_precision,
        }


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)) or "model"


def _load_merged(model: nn.Module, merged: Dict[str, torch.Tensor]) -> None:
    """Loads regmean-gpu's merged tensors into the pretrained module, every one of them."""
    own = model.state_dict()
    values = {}
    for key, value in merged.items():
        # A CLIPVisionModel's keys carry `vision_model.`; a bare tower's do not.
        for candidate in (key, "vision_model." + key, key.removeprefix("vision_model.")):
            if candidate in own:
                values[candidate] = value.to(own[candidate].dtype)
                break
        else:
            raise KeyError(f"the merged tensor {key} has no place in the {type(model).__name__}")
    model.load_state_dict(values, strict=False)


class _ClipData:
    """CLIP: the train dataset through FusionBench's image dataset and CLIP processor."""

    def _loader_kwargs(self) -> Dict[str, Any]:
        kwargs = dict(self._param("dataloader_kwargs", {}) or {})
        unknown = sorted(set(kwargs) - _LOADER_SPEED_KEYS)
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: dataloader_kwargs {unknown} are not honoured "
                f"(regmean-gpu batches the examples itself; accepted: {sorted(_LOADER_SPEED_KEYS)})"
            )
        if "batch_size" not in kwargs:
            raise ValueError(f"{type(self).__name__}: dataloader_kwargs needs batch_size")
        return kwargs

    def _batch_size(self) -> int:
        return int(self._loader_kwargs()["batch_size"])

    def _write_data(self, name: str, dataset, folder: Path) -> Path:
        kwargs = self._loader_kwargs()
        kwargs.pop("batch_size")
        examples = ImageClassificationDataset(dataset, self.clip_processor)
        subset = torch.utils.data.Subset(examples, self._indices(len(examples)))
        loader = torch.utils.data.DataLoader(subset, batch_size=self._batch_size(), shuffle=False, **kwargs)
        pixels = torch.cat([images for images, _labels in loader]).float().contiguous()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{_safe_name(name)}.safetensors"
        save_file({"pixel_values": pixels}, str(path))
        return path


class RegMeanAlgorithmForCLIP(_ClipData, _RegMeanGpu, _fb_clip.RegMeanAlgorithmForCLIP):
    """FusionBench's ``RegMeanAlgorithmForCLIP``, merged by regmean-gpu.

    Same arguments (``num_regmean_examples``, ``exclude_param_names_regex``,
    ``reduce_non_diagonal_ratio``, ``weight_transpose``, ``dataloader_kwargs``), plus
    regmean-gpu's keywords ``device``, ``precision``, ``seed``, ``shuffle``, ``quiet``.
    """

    def __init__(self, *args, device: str = "auto", precision: str = "float32", seed: int = 0,
                 shuffle: bool = True, quiet: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._take_extras(device, precision, seed, shuffle, quiet)


class RegMeanAlgorithmForCLIPPlusPlus(_ClipData, _RegMeanGpu, _fb_clip_pp.RegMeanAlgorithmForCLIPPlusPlus):
    """FusionBench's ``RegMeanAlgorithmForCLIPPlusPlus`` (RegMean++), merged by regmean-gpu.

    Same arguments as FusionBench's class, plus regmean-gpu's keywords.
    """

    # FusionBench 0.2.33 declares this mapping as a plain dict, which its own constructor
    # cannot use (it looks up `.inverse`): merged into the parent's bidict here.
    _config_mapping = bidict(RegMeanAlgorithmPlusPlus._config_mapping)
    _config_mapping.update(_fb_clip_pp.RegMeanAlgorithmForCLIPPlusPlus._config_mapping)
    _merge_method = "regmean_plusplus"

    def __init__(self, *args, device: str = "auto", precision: str = "float32", seed: int = 0,
                 shuffle: bool = True, quiet: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._take_extras(device, precision, seed, shuffle, quiet)

    def _base_model(self, modelpool: BaseModelPool) -> nn.Module:
        return modelpool.load_pretrained_model()


class RegMeanAlgorithmForGPT2(_RegMeanGpu, _fb_gpt2.RegMeanAlgorithmForGPT2):
    """FusionBench's ``RegMeanAlgorithmForGPT2``, merged by regmean-gpu.

    Same arguments (``num_regmean_examples``, ``exclude_param_names_regex``,
    ``reduce_non_diagonal_ratio``, ``weight_transpose`` — False, GPT-2's Conv1D layout —,
    ``cache_dir``, ``batch_size``, ``num_workers``), plus regmean-gpu's keywords. The train
    datasets are FusionBench's tokenised ones (``input_ids``, ``attention_mask``, padded to
    one length, as its ``default_data_collator`` needs); that length is the merge's
    ``max_length``, and the padding token the data uses is the one regmean-gpu pads with.
    """

    _weight_transpose = False

    def __init__(self, *args, device: str = "auto", precision: str = "float32", seed: int = 0,
                 shuffle: bool = True, quiet: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._take_extras(device, precision, seed, shuffle, quiet)
        self._max_length = None
        self._pad_id = None

    def _batch_size(self) -> int:
        return int(self._param("batch_size"))

    def _write_data(self, name: str, dataset, folder: Path) -> Path:
        rows = []
        lengths = set()
        pad_ids = set()
        for i in self._indices(len(dataset)):
            item = dataset[i]
            ids = torch.as_tensor(item["input_ids"]).reshape(-1).tolist()
            mask = item.get("attention_mask")
            mask = [1] * len(ids) if mask is None else torch.as_tensor(mask).reshape(-1).tolist()
            real = sum(mask)
            if mask != [1] * real + [0] * (len(ids) - real):
                raise ValueError(f"{name}: example {i} is not right-padded; regmean-gpu reads right padding only")
            lengths.add(len(ids))
            pad_ids.update(ids[real:])
            rows.append({"input_ids": ids[:real]})
        if len(lengths) > 1:
            raise ValueError(
                f"{name}: the tokenised examples have different lengths {sorted(lengths)}; "
                "FusionBench's default_data_collator batches examples of one length (pad them to max_length)"
            )
        if len(pad_ids) > 1:
            raise ValueError(f"{name}: the examples pad with several token ids {sorted(pad_ids)}")
        length = lengths.pop() if lengths else 1
        if self._max_length not in (None, length):
            raise ValueError(
                f"{name}: examples of length {length}, another task's are {self._max_length}: "
                "regmean-gpu pads every task to one max_length"
            )
        self._max_length = length
        self._pad_id = pad_ids.pop() if pad_ids else None
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{_safe_name(name)}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def _adjust_task_config(self, folder: Path) -> None:
        # FusionBench's padding rows enter the Grams: they must carry the data's pad id.
        if self._pad_id is not None:
            config_path = folder / "config.json"
            config = json.loads(config_path.read_text())
            config["pad_token_id"] = int(self._pad_id)
            config_path.write_text(json.dumps(config, indent=2))

    def _parameters(self) -> Dict[str, Any]:
        params = super()._parameters()
        params["max_length"] = int(self._max_length or 1)
        return params


def _names(items: Iterable[str]) -> str:
    return ", ".join(sorted(items))
