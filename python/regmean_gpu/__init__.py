"""regmean-gpu from Python: merge fine-tuned transformer checkpoints with RegMean.

``merge`` and ``eval`` run the engine of the ``regmean-gpu`` command line in this
process, with its guards and messages: the output goes beside the inputs (never over,
around or inside them), it is written into a hidden sibling and renamed into place when
complete, and a failure raises :class:`RegMeanError` with the command line's one-line
message. Ctrl-C stops the run at its next batch, model or layer, removes its partial
output and raises ``KeyboardInterrupt``.

``GramAccumulator`` and ``solve`` take the caller's own tensors (DLPack) for the Grams of
activations it computed and the per-layer closed form. ``regmean_gpu.fusionbench`` holds drop-in replacements of FusionBench's RegMean classes.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional, Union

from . import _native
from ._native import RegMeanError
from .accumulator import GramAccumulator, solve

__all__ = ["merge", "eval", "GramAccumulator", "solve", "RegMeanError", "__version__"]
__version__ = _native.__version__

PathLike = Union[str, "os.PathLike[str]"]

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(GB|MB|KB|B)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def _size(value: Union[int, str, None], what: str) -> Optional[int]:
    """Bytes from an int or a string like "5GB" / "500MB" (the command line's sizes)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ValueError(f"{what}: `{value}` is not a size like 5GB, 500MB or 1000000")
        unit = m.group(2).upper() if m.group(2) else None
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"{what}: the size must be positive")
    return n


def _path(p: Optional[PathLike]) -> Optional[str]:
    return None if p is None else os.fspath(p)


def merge(
    config: Union[PathLike, Mapping[str, Any]],
    out_dir: PathLike,
    device: str = "auto",
    force: bool = False,
    quiet: bool = False,
    verbose: int = 0,
    precision: Optional[str] = None,
    out_shard_size: Union[int, str] = "5GB",
    max_memory: Union[int, str, None] = None,
    report_json: Optional[PathLike] = None,
) -> dict:
    """Merges the models a config lists into the model directory ``out_dir``.

    ``config`` is the path of a merge YAML, or a dict of the same schema
    (``merge_method``, ``base_model``, ``models``, ``parameters``, ``out_dtype``); a
    dict's relative paths are relative to the current directory (a file's: to the file).
    The other arguments are the ``merge`` command's flags: ``device`` (``auto``, ``cpu``,
    ``cuda``, ``cuda:N``), ``force`` (replace an earlier output), ``quiet`` (no progress
    on stderr), ``verbose`` (``-v``), ``precision`` (``float16`` / ``float32`` on a
    GPU, overriding the config), ``out_shard_size``, ``max_memory`` (ints in bytes or
    strings like ``"8GB"``) and ``report_json`` (also write the report there).

    Returns the report ``--report-json`` writes: ``phases_s`` (seconds per phase),
    ``models`` (examples and rows each), ``fallbacks`` (layers that needed the fallback
    solve), ``peak_rss_bytes``, ``peak_device_bytes``, ``layers_solved``, ``schedule``...
    """
    if isinstance(config, Mapping):
        config_path, config_text = None, json.dumps(dict(config), default=os.fspath)
    else:
        config_path, config_text = os.fspath(config), None
    report = _native.merge(
        config_path,
        config_text,
        os.fspath(out_dir),
        str(device),
        bool(force),
        bool(quiet),
        int(verbose),
        _size(out_shard_size, "out_shard_size"),
        _size(max_memory, "max_memory"),
        precision,
        _path(report_json),
    )
    return json.loads(report)


def eval(  # noqa: A001  (the command's name)
    model: PathLike,
    config: Optional[PathLike] = None,
    data: Optional[PathLike] = None,
    task: Optional[str] = None,
    head: Optional[PathLike] = None,
    classes: Optional[PathLike] = None,
    base: Optional[PathLike] = None,
    batch_size: Optional[int] = None,
    max_length: Optional[int] = None,
    device: str = "auto",
    precision: str = "float32",
    quiet: bool = False,
) -> dict:
    """Evaluates ``model`` as ``regmean-gpu eval`` does and returns what ``--json`` prints.

    Give ``config`` (a merge config: every model entry with ``eval_data`` is a task) or
    ``data`` (one task's labelled data, with ``task``, ``head`` for GPT-2 or ``classes``
    for CLIP). GPT-2 and CLIP give accuracy per task; decoder LLMs the next-token loss.
    """
    if config is None and data is None:
        raise ValueError("give config (a merge config with eval_data per model) or data")
    result = _native.eval(
        os.fspath(model),
        _path(config),
        _path(data),
        task,
        _path(head),
        _path(classes),
        _path(base),
        batch_size,
        max_length,
        str(device),
        precision,
        bool(quiet),
    )
    return json.loads(result)
