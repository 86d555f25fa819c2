"""Helpers every GPU benchmark shares: timing and the best dense SDPA measured
in the same run (``xflex.benchmark.timing``, also used by ``xflex bench``),
and peak memory."""

from __future__ import annotations

from collections.abc import Callable

import torch

from xflex.benchmark.timing import best_dense_sdpa, dense_sdpa, time_ms

__all__ = ["best_dense_sdpa", "dense_sdpa", "peak_extra_mib", "time_ms"]


def peak_extra_mib(fn: Callable[[], object], baseline: int | None = None) -> float:
    """Peak GPU memory while ``fn`` runs beyond ``baseline`` bytes (default:
    what is allocated before it), in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if baseline is None else baseline
    result = fn()
    torch.cuda.synchronize()
    del result
    return (torch.cuda.max_memory_allocated() - before) / 2**20
