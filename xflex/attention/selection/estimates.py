"""Which of two estimates' selections a head keeps under
``scoring_reduction="mean+max"``: their union, or the max's alone where the
mean keeps many times as many blocks.

Why: the mean of a tile's S products dilutes a product that only one offset
sees (a hot key, a slash line), so on spiky heads its estimate is nearly flat
and its cut keeps most visible blocks, while the max's keeps few and finds the
lines; on heads whose attention is smooth or whose mass is spread the two cuts
keep about as many blocks and their union catches what either misses.
The max's estimate is sharper than the true attention where it is chosen: at
the same tau its cut keeps less true mass than tau (spiky, 128K: recall
0.86 at tau 0.99, 0.95 at 0.999), so the heads it serves alone cut at a tenth
of the missing mass (bench/RESULTS.md, "Choosing the estimate per head").
"""

from __future__ import annotations

import torch

__all__ = ["MAX_ALONE_MISSING_MASS", "max_alone_heads", "max_alone_threshold"]

# The share of tau's missing mass (1 - tau) a head that keeps the max's blocks alone may miss.
MAX_ALONE_MISSING_MASS = 0.1


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


def max_alone_threshold(threshold: torch.Tensor) -> torch.Tensor:
    """The threshold of the max's cut on the heads that keep it alone:
    ``1 - MAX_ALONE_MISSING_MASS * (1 - threshold)``.

    Example:
        >>> max_alone_threshold(torch.tensor([0.9, 0.99, 1.0]))
        tensor([0.9900, 0.9990, 1.0000])
    """
    return 1.0 - MAX_ALONE_MISSING_MASS * (1.0 - threshold)
