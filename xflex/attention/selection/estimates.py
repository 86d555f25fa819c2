"""Which of two estimates' selections a head keeps under
``scoring_reduction="mean+max"``: their union, or the max's alone where the
mean keeps many times as many blocks.

Why: the mean of a tile's S products dilutes a product that only one offset
sees (a hot key, a slash line), so on spiky heads its estimate is nearly flat
and its cut keeps most visible blocks, while the max's keeps few and finds the
lines; on heads whose attention is smooth or whose mass is spread the two cuts
keep about as many blocks and their union catches what either misses
(bench/RESULTS.md, "Choosing the estimate per head").
"""

from __future__ import annotations

import torch

__all__ = ["max_alone_heads"]


def max_alone_heads(mean_kept: torch.Tensor, max_kept: torch.Tensor, ratio: float) -> torch.Tensor:
    """The heads whose mean cut keeps more than ``ratio`` times the blocks of their max cut.

    Args:
        mean_kept, max_kept: ``(B, H, nQ, nK)`` bool, each estimate's selection.
        ratio: > 0; counts are over all of a head's query rows.

    Returns:
        ``(B, H, 1, 1)`` bool.

    Example:
        >>> mean = torch.tensor([[[[True, True, True, True]], [[True, False, False, True]]]])
        >>> most = torch.tensor([[[[True, False, False, False]], [[True, False, False, False]]]])
        >>> max_alone_heads(mean, most, 1.5).flatten().tolist()
        [True, True]
        >>> max_alone_heads(mean, most, 3.0).flatten().tolist()
        [True, False]
    """
    mean_count = mean_kept.sum((2, 3), keepdim=True, dtype=torch.int64)
    max_count = max_kept.sum((2, 3), keepdim=True, dtype=torch.int64)
    return mean_count > ratio * max_count
