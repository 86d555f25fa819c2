"""Vertical lines: key blocks that hold attention the estimate does not see.

A hot key (a sink-like token, a key of large norm) is one of S products in
a reduced tile's mean, so the strided estimate dilutes its block's mass by up
to orders of magnitude (``probes.py``). On a few probe query blocks the true
mass is cheap to compute exactly; a key block whose true mass there exceeds
the estimate's share by ``min_mass``, on average over the probe blocks but
the one where it exceeds it most, is a column the estimate misses, and such
columns (MInference's "vertical lines") matter to most rows, so every row
that sees it keeps it. The largest is left out because a block that only
one probe attends to is that probe's local attention (a video's
neighbouring frames, which the estimate underrates on sharp heads): adding
it to every row cost a sharp video call at 16K 0.017 of density for no
recall (bench/RESULTS.md, "Probe rows"). Blocks the estimate already rates
correctly (topics, local neighbourhoods) have no deficit and are not added:
the rule costs no blocks on smooth attention (bench/RESULTS.md, "Vertical
lines").
"""

from __future__ import annotations

import functools

import torch

__all__ = ["mean_but_largest", "probe_deficit", "vertical_blocks"]


def vertical_blocks(
    probe_mass: torch.Tensor,
    probe_scores: torch.Tensor,
    probe_visible: torch.Tensor,
    probe_blocks: list[int],
    *,
    min_mass: float,
    slash: torch.Tensor | None = None,
) -> torch.Tensor:
    """The key blocks whose true mass on the probe rows exceeds the
    estimate's by at least ``min_mass`` on average over all probe rows but
    the one where it exceeds it most (that one alone for a single probe).

    Key blocks next to a probe block (within one) are never chosen: what they
    hold is the probes' own local attention, which other rows' forced
    diagonals already keep.

    Args:
        probe_mass: ``(B, H, P, nK)`` exact attention mass per key block of the
            probe rows (each row sums to 1, or 0 when it sees no key).
        probe_scores: ``(B, H, P, nK)`` the estimate's block scores of the same rows.
        probe_visible: bool, broadcastable to ``probe_scores``.
        probe_blocks: the P probe query block indices.
        min_mass: the smallest such mean deficit (true share minus
            estimated share) that makes a block vertical; in (0, 1).
        slash: ``(B, H, P, nK)`` bool, the probe rows' blocks that slash
            lines keep already (``slash.py``), whose deficits are left out;
            or None.

    Returns:
        ``(B, H, 1, nK)`` bool, to broadcast over query rows.

    Example:
        >>> mass = torch.tensor([[[[0.5, 0.3, 0.0, 0.2]]]])
        >>> est = torch.tensor([[[[0.9, 0.0, 0.0, 0.1]]]])
        >>> vertical_blocks(mass, est, torch.tensor(True), [3], min_mass=0.05)
        tensor([[[[False,  True, False, False]]]])
    """
    # The mean of all but the largest: one probe's local attention is no column.
    deficit = probe_deficit(probe_mass, probe_scores, probe_visible)
    if slash is not None:
        deficit = deficit.masked_fill(slash, 0.0)
    deficit = mean_but_largest(deficit, dim=2)
    return (deficit >= min_mass) & _away_from(tuple(probe_blocks), probe_scores.shape[-1], probe_scores.device)


def probe_deficit(probe_mass: torch.Tensor, probe_scores: torch.Tensor, probe_visible: torch.Tensor) -> torch.Tensor:
    """``(B, H, P, nK)``: per probe row and key block, the true mass minus the
    estimate's share of its row (the scores normalised over visible blocks), or 0."""
    visible = probe_visible.expand_as(probe_scores)
    estimate = probe_scores.float().masked_fill(~visible, 0.0)
    estimate = estimate / estimate.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (probe_mass - estimate).clamp_min(0.0)


def mean_but_largest(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The mean over ``dim`` of all values but the largest (kept as a size-1
    dim); the value itself where ``dim`` has one."""
    if values.shape[dim] == 1:
        return values
    return (values.sum(dim, keepdim=True) - values.amax(dim, keepdim=True)) / (values.shape[dim] - 1)


@functools.lru_cache(maxsize=64)
def _away_from(probe_blocks: tuple[int, ...], n_key_blocks: int, device: torch.device) -> torch.Tensor:
    """``(nK,)`` bool: key blocks more than one block from every probe block."""
    near = torch.zeros(n_key_blocks, dtype=torch.bool)
    for block in probe_blocks:
        near[max(0, block - 1) : block + 2] = True
    return (~near).to(device)
