"""A floor relative to the row's largest block: every block whose estimated
score reaches a fraction of the largest in its query row is kept, beside the
threshold cut (FlashPrefill keeps blocks at alpha times the row max, with no
sort).

Why beside the cut: the cut keeps the fewest blocks whose *estimated* mass
reaches tau, so a block the estimate underrates by a factor of a few is the
first dropped. Under the sharp ``"max"`` estimate a hot key's block keeps a
score within that factor of the largest (its one large product is seen),
while blocks without planted structure sit orders of magnitude below: a
floor of 0.01 keeps the former and almost none of the latter
(bench/RESULTS.md, "A floor relative to the row's largest block").
"""

from __future__ import annotations

import torch

__all__ = ["relative_floor_blocks"]


def relative_floor_blocks(scores: torch.Tensor, visible: torch.Tensor, ratio: float) -> torch.Tensor:
    """The visible blocks whose score is at least ``ratio`` times the largest
    visible score of their query row.

    Args:
        scores: ``(B, H, nQ, nK)`` non-negative block scores.
        visible: bool, broadcastable to ``scores``.
        ratio: in (0, 1).

    Returns:
        ``(B, H, nQ, nK)`` bool (a row that sees no key keeps nothing).

    Example:
        >>> s = torch.tensor([[[[0.5, 0.004, 0.02, 0.3]]]])
        >>> relative_floor_blocks(s, torch.tensor(True), 0.01)
        tensor([[[[ True, False,  True,  True]]]])
    """
    scores = scores.float().masked_fill(~visible, -1.0)  # scores are >= 0: invisible blocks never reach a floor
    row_max = scores.amax(-1, keepdim=True)
    return (scores >= ratio * row_max) & (row_max > 0)
