"""Grams from the caller's own tensors: ``GramAccumulator`` and ``solve``.

Any DLPack tensor is read in place (torch, NumPy, JAX, CuPy...): rows × dim, float32,
float16 or bfloat16, each row contiguous (a row stride is fine). On a GPU the work is queued
on the caller's current CUDA stream (torch's, unless ``stream=`` says otherwise).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from . import _native

__all__ = ["GramAccumulator", "solve"]


class DLPackMatrix:
    """An f32 matrix regmean-gpu made, handed out through DLPack: ``torch.from_dlpack(m)`` or
    ``numpy.from_dlpack(m)`` takes it without a copy (once)."""

    def __init__(self, capsule: Any, shape: Tuple[int, int]):
        self._capsule = capsule
        self.shape = shape

    def __dlpack__(self, *, stream: Any = None, **_kwargs: Any) -> Any:
        if self._capsule is None:
            raise BufferError("this matrix was already taken through DLPack")
        capsule, self._capsule = self._capsule, None
        return capsule

    def __dlpack_device__(self) -> Tuple[int, int]:
        return (1, 0)  # kDLCPU


def _device(device: str) -> Optional[int]:
    if device == "cpu":
        return None
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise ValueError(f"device `{device}`: expected cpu, cuda or cuda:N")


def _capsule(x: Any, stream: Optional[int] = None) -> Any:
    if not hasattr(x, "__dlpack__"):
        raise TypeError(f"expected a DLPack tensor (an object with __dlpack__), got {type(x).__name__}")
    return x.__dlpack__() if stream is None else x.__dlpack__(stream=stream)


class GramAccumulator:
    """Accumulates the Gram matrix XᵀX of activation rows, as the merge does.

    ``GramAccumulator(dim, device="cpu")``; ``update(x, mask=None)`` adds the rows of ``x``
    (``[rows, dim]``) whose mask byte (bool or uint8, one per row) is non-zero;
    ``finish()`` gives the ``[dim, dim]`` f32 Gram Σ XᵀX / rows (with
    ``fusionbench_compat=True``: FusionBench's running mean over every row, no mask) as a
    DLPack matrix in host memory — the G of the merge's Gram files, before
    ``reduce_non_diagonal_ratio``. ``rows`` counts the rows added. On ``device="cuda[:N]"``
    the accumulator queues its work on ``stream`` (default: torch's current stream of that
    device); keep ``x`` alive until that stream has passed the update. The CUDA path is not
    verified on a GPU yet.
    """

    def __init__(self, dim: int, device: str = "cpu", stream: Optional[int] = None,
                 fusionbench_compat: bool = False):
        cuda = _device(str(device))
        if cuda is not None and stream is None:
            import torch  # the caller's stream: torch's current one

            stream = torch.cuda.current_stream(cuda).cuda_stream
        self._stream = None if cuda is None else int(stream or 0)
        self._native = _native.GramAccumulator(int(dim), cuda, self._stream or 0, bool(fusionbench_compat))

    def update(self, x: Any, mask: Any = None) -> None:
        self._native.update(_capsule(x, self._stream), None if mask is None else _capsule(mask, self._stream))

    @property
    def rows(self) -> int:
        return self._native.rows

    @property
    def dim(self) -> int:
        return self._native.dim

    def finish(self) -> DLPackMatrix:
        dim = self._native.dim
        capsule, _rows = self._native.finish()
        return DLPackMatrix(capsule, (dim, dim))


def solve(gram_sum: Any, gw_sum: Any, w_mean: Any) -> Tuple[DLPackMatrix, str]:
    """One layer's RegMean closed form from sums the caller holds.

    ``gram_sum`` = Σ G'ᵢ ``[d_in, d_in]`` (symmetric), ``gw_sum`` = Σ G'ᵢWᵢ and ``w_mean``
    = the mean task weight, both ``[d_in, d_out]`` with the weights as ``[in, out]``
    (an ``nn.Linear`` weight transposed); contiguous float32 CPU tensors. Solved in float64
    by Cholesky with the merge's fallback; returns W ``[d_in, d_out]`` and how it was solved.
    """
    capsule, how = _native.solve(_capsule(gram_sum), _capsule(gw_sum), _capsule(w_mean))
    d_in, d_out = _shape(gw_sum)
    return DLPackMatrix(capsule, (d_in, d_out)), how


def _shape(x: Any) -> Tuple[int, int]:
    shape = tuple(getattr(x, "shape", ()))
    return (int(shape[0]), int(shape[1])) if len(shape) == 2 else (0, 0)
