"""Probe-calibrated thresholds: the threshold rule evaluated, at many settings
at once, on a few probe query blocks whose exact attention is known, and the
cheapest setting per head that keeps a target share of the true mass there.

The strided estimate is right about which blocks matter on smooth attention
and wrong on spiky attention: a hot key is one of S products in a reduced
tile's mean, so its tile's estimated mass is diluted, and a tile's pairing
of rows crosses only some diagonals q - k (the antidiagonal: odd offsets
only; the interleaved pairing: every residue but S/2), so slash lines at the
others are never seen (bench/RESULTS.md, "Selection quality"). No single threshold or temperature fits both (a sharper
temperature finds hot keys and over-trusts smooth rows). Measuring the
estimate against the truth on a few rows of the call itself does.
"""

from __future__ import annotations

import torch

__all__ = ["PROBE_ROWS_PER_BLOCK", "PROBE_TEMPERATURES", "PROBE_THRESHOLDS", "cheapest_reaching", "probe_query_blocks", "threshold_rule_on_probes"]

# Candidate thresholds; 1.0 keeps every visible block, so some setting always
# reaches any target.
PROBE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0)
# Candidate scorer temperatures (multiplying the reduced logits): 1 is the
# paper's estimate; up to S undoes the 1/S of a single hot product.
PROBE_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
# Rows of each probe block whose exact attention stands for the block (evenly
# spaced, its last included): hot keys and the estimate's misses are shared by
# most rows of a block, so a quarter of a 128-row block finds them for a
# quarter of the exact pass's time (bench/RESULTS.md, "Probe rows").
PROBE_ROWS_PER_BLOCK = 32


def probe_query_blocks(n_query_blocks: int, count: int, *, causal: bool) -> list[int]:
    """The query blocks to probe: the last ``count`` for causal calls (they see
    every key, so they show every kind of key block), evenly spread otherwise.

    Example:
        >>> probe_query_blocks(10, 3, causal=True), probe_query_blocks(10, 3, causal=False)
        ([7, 8, 9], [0, 4, 9])
    """
    count = max(1, min(count, n_query_blocks))
    if causal:
        return list(range(n_query_blocks - count, n_query_blocks))
    return sorted(set(torch.linspace(0, n_query_blocks - 1, count).round().long().tolist()))


def threshold_rule_on_probes(
    scores: torch.Tensor,
    mass: torch.Tensor,
    *,
    visible: torch.Tensor,
    forced: torch.Tensor,
    thresholds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``select_blocks`` keeps on probe rows at each threshold, and the
    true mass it keeps, in one pass (one sort, no loop over thresholds).

    Args:
        scores: ``(..., P, nK)`` estimated block scores of the probe rows.
        mass: ``(..., P, nK)`` their true attention mass per block (broadcastable to ``scores``).
        visible, forced: bool, broadcastable to ``scores`` (as in ``select_blocks``).
        thresholds: ``(T,)`` thresholds.

    Returns:
        ``(recall, kept)``: ``(T, ..., P)`` true mass inside the kept blocks, and
        the number of blocks kept.
    """
    visible = visible.expand_as(scores)
    forced = forced.expand_as(scores) & visible
    estimate = scores.float().masked_fill(~visible, 0.0)
    # The same sums as select_blocks (so that ties at tau fall the same way):
    # forced blocks first, then the candidates by score (ties by index, as its
    # stable sort orders them), invisible ones last.
    total = estimate.sum(-1, keepdim=True)
    forced_mass = estimate.masked_fill(~forced, 0.0).sum(-1, keepdim=True)
    key = torch.where(forced, float("inf"), torch.where(visible, estimate, -1.0))
    order = key.sort(dim=-1, descending=True, stable=True).indices
    candidates = estimate.masked_fill(forced, 0.0).gather(-1, order)
    before = forced_mass + (candidates.cumsum(-1) - candidates)
    tau = thresholds.to(scores.device, torch.float32).view(-1, *([1] * scores.dim()))
    # The kept blocks are a prefix of this order: every forced block, then the
    # candidates while the estimated mass before them stays below tau of the row.
    n_forced, n_visible = forced.sum(-1), visible.sum(-1)
    within = ((before < tau * total) & (torch.arange(scores.shape[-1], device=scores.device) >= n_forced[..., None])).sum(-1)
    kept = (n_forced + within).minimum(n_visible)
    kept = torch.where(tau.squeeze(-1) >= 1.0, n_visible, kept)  # tau >= 1 keeps every visible block
    kept_mass = torch.nn.functional.pad(mass.float().expand_as(scores).gather(-1, order).cumsum(-1), (1, 0))
    recall = kept_mass.expand(len(thresholds), *kept_mass.shape).gather(-1, kept.unsqueeze(-1)).squeeze(-1)
    return recall, kept


def cheapest_reaching(recall: torch.Tensor, cost: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per head, the index of the cheapest setting whose mean recall reaches the target.

    Args:
        recall, cost: ``(N, H)`` per setting and head (mean over probe rows).
        target: ``(H,)`` the recall each head must reach.

    Returns:
        ``(H,)`` int64 setting indices; where no setting reaches the target,
        the one with the highest recall. Ties go to the first setting.

    Example:
        >>> cheapest_reaching(torch.tensor([[0.9], [0.97], [1.0]]), torch.tensor([[0.2], [0.4], [1.0]]), torch.tensor([0.95]))
        tensor([1])
    """
    reaching = recall >= target
    best_cost = torch.where(reaching, cost, float("inf")).argmin(0)
    return torch.where(reaching.any(0), best_cost, recall.argmax(0))
