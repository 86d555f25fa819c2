"""Slash lines: diagonals of key blocks that hold attention the estimate does
not see.

A head that attends to the token a fixed distance back (MInference's "slash
lines": induction and positional heads) puts its mass on one diagonal
``q - k = d``. The strided estimate samples each tile's products at S
offsets only, and the interleaved pairing never crosses offsets of residue
S/2 mod S (``xflex.attention.scoring.paired_query_rows``), so such a line
can be invisible to it; a sharp estimate (``scoring_reduction="max"``) then
drops its blocks, which a flat one keeps only by keeping nearly everything
(bench/RESULTS.md, "Slash lines"). On the probe rows, where the true mass is
known, a slash is a deficit (true share minus estimated share) at the same
block offset ``j = query block - key block`` in most probes: such a
diagonal is kept in every row. A hot key (a vertical line) sits at a
different offset in each probe, and the mean over all probes but the one
with the largest deficit discounts it, as ``vertical.py`` discounts one
probe's local attention. Slash lines are found first: a slash between two
block diagonals puts its deficit on one key block of two neighbouring
probes, which the vertical rule would take for a column near the probes
and keep there only (the spiky family's worst rows; bench/RESULTS.md,
"Slash lines before vertical lines").
"""

from __future__ import annotations

import functools

import torch

from .vertical import mean_but_largest, probe_deficit

__all__ = ["slash_blocks"]


def slash_blocks(
    probe_mass: torch.Tensor,
    probe_scores: torch.Tensor,
    probe_visible: torch.Tensor,
    probe_blocks: list[int],
    *,
    n_query_blocks: int,
    min_mass: float,
) -> torch.Tensor:
    """The block diagonals whose true mass on the probe rows exceeds the
    estimate's by at least ``min_mass``, on average over all probe rows but
    the one where it exceeds it most, as blocks of every query row.

    The diagonal ``j = 0`` (each row's own block, which the forced blocks
    keep) is never chosen.

    Args:
        probe_mass: ``(B, H, P, nK)`` exact attention mass per key block of the
            probe rows (each row sums to 1, or 0 when it sees no key).
        probe_scores: ``(B, H, P, nK)`` the estimate's block scores of the same rows.
        probe_visible: bool, broadcastable to ``probe_scores``.
        probe_blocks: the P probe query block indices.
        n_query_blocks: the call's query blocks nQ.
        min_mass: the smallest such mean deficit that makes a diagonal a
            slash line; in (0, 1).

    Returns:
        ``(B, H, nQ, nK)`` bool: block ``(i, k)`` lies on a slash line ``i - k``.

    Example:
        >>> mass = torch.tensor([[[[0.0, 0.5, 0.0, 0.5], [0.0, 0.0, 0.5, 0.5]]]])
        >>> est = torch.tensor([[[[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]]])
        >>> slash_blocks(mass, est, torch.tensor(True), [3, 4], n_query_blocks=5, min_mass=0.1)[0, 0].int()
        tensor([[0, 0, 0, 0],
                [0, 0, 0, 0],
                [1, 0, 0, 0],
                [0, 1, 0, 0],
                [0, 0, 1, 0]], dtype=torch.int32)
    """
    deficit = probe_deficit(probe_mass, probe_scores, probe_visible)
    B, H, P, n_k = deficit.shape
    device = deficit.device
    # Probe p's key block k lies on diagonal j = p - k, stored at j + nK - 1.
    diagonal = _diagonal_index(tuple(probe_blocks), n_k, device)  # (P, nK)
    by_diagonal = deficit.new_zeros(B, H, P, n_query_blocks + n_k - 1)
    by_diagonal.scatter_(-1, diagonal.expand(B, H, P, n_k), deficit)
    slashes = mean_but_largest(by_diagonal, dim=2).squeeze(2) >= min_mass  # (B, H, nQ + nK - 1)
    slashes[..., n_k - 1] = False
    return slashes[:, :, _diagonal_index(tuple(range(n_query_blocks)), n_k, device)]


@functools.lru_cache(maxsize=64)
def _diagonal_index(query_blocks: tuple[int, ...], n_key_blocks: int, device: torch.device) -> torch.Tensor:
    """``(len(query_blocks), nK)`` int64: ``q - k + nK - 1`` for each query block q and key block k."""
    rows = torch.tensor(query_blocks, dtype=torch.int64)[:, None]
    return (rows - torch.arange(n_key_blocks)[None, :] + n_key_blocks - 1).to(device)
