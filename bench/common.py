"""Helpers the benchmarks share: timing and the best dense SDPA measured in
the same run (``xflex.benchmark.timing``, also used by ``xflex bench``), peak
GPU memory, and the names of selection settings in tables."""

from __future__ import annotations

from collections.abc import Callable

import torch

from xflex.benchmark.timing import best_dense_sdpa, dense_sdpa, time_ms
from xflex.config import Config

__all__ = ["DEFAULT_MAX_ALONE_RATIO", "DEFAULT_PRECISION", "DEFAULT_REDUCTION", "DEFAULT_RELATIVE_FLOOR", "DEFAULT_SCORER", "DEFAULT_SLASH_MASS", "DEFAULT_VERTICAL_MASS", "best_dense_sdpa", "dense_sdpa", "peak_extra_mib", "setting_name", "time_ms"]

DEFAULT_SCORER = Config().scorer
DEFAULT_PRECISION = Config().scoring_precision
DEFAULT_REDUCTION = Config().scoring_reduction
DEFAULT_VERTICAL_MASS = Config().vertical_mass
DEFAULT_SLASH_MASS = Config().slash_mass
DEFAULT_RELATIVE_FLOOR = Config().relative_floor
DEFAULT_MAX_ALONE_RATIO = Config().max_alone_ratio


def setting_name(
    method: str,
    scorer: str,
    precision: str = DEFAULT_PRECISION,
    vertical_mass: float = DEFAULT_VERTICAL_MASS,
    reduction: str = DEFAULT_REDUCTION,
    slash_mass: float = DEFAULT_SLASH_MASS,
    relative_floor: float = DEFAULT_RELATIVE_FLOOR,
    max_alone_ratio: float = DEFAULT_MAX_ALONE_RATIO,
) -> str:
    """A selection setting as the bench tables name it: the method, then
    ``+scorer``, ``+precision``, ``+vertical=X``, ``+reduction``,
    ``+slash=X``, ``+floor=X`` and ``+alone=X`` where they are not the
    defaults (``"threshold+antidiagonal"``, ``"threshold+fp8"``,
    ``"threshold+vertical=0"``, ``"threshold+max"``,
    ``"threshold+slash=0.005"``, ``"threshold+floor=0.01"``,
    ``"threshold+mean+max+alone=2"``)."""
    defaults = (
        (scorer, DEFAULT_SCORER),
        (precision, DEFAULT_PRECISION),
        (f"vertical={vertical_mass:g}", f"vertical={DEFAULT_VERTICAL_MASS:g}"),
        (reduction, DEFAULT_REDUCTION),
        (f"slash={slash_mass:g}", f"slash={DEFAULT_SLASH_MASS:g}"),
        (f"floor={relative_floor:g}", f"floor={DEFAULT_RELATIVE_FLOOR:g}"),
        (f"alone={max_alone_ratio:g}", f"alone={DEFAULT_MAX_ALONE_RATIO:g}"),
    )
    return "+".join([method] + [x for x, default in defaults if x != default])


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
