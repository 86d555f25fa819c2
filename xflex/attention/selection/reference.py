"""Threshold selection in plain torch (the reference): block scores to the
key blocks each query block computes, on the scores' device with no host
synchronisation."""

from __future__ import annotations

import torch

from .blocks import KVBlocks

__all__ = ["as_kv_blocks", "select_blocks", "select_kv_blocks_reference", "to_kv_blocks"]

# Query-block rows are independent: work on this many score elements at a
# time so the sort's fp32 values and int64 indices stay a few hundred MiB
# (at 256K tokens and 32 heads the whole (B, H, nQ, nK) sort needs ~2 GiB).
_CHUNK_ELEMENTS = 1 << 25


def _row_chunks(shape: torch.Size) -> list[slice]:
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, shape[0] * shape[1] * shape[3]))
    return [slice(start, start + rows_per_chunk) for start in range(0, shape[2], rows_per_chunk)]


def select_blocks(
    scores: torch.Tensor,
    *,
    visible: torch.Tensor,
    forced: torch.Tensor,
    threshold: torch.Tensor | float,
) -> torch.Tensor:
    """Keep, per query block, the forced blocks plus the highest-scoring others
    until the kept mass reaches ``threshold`` of the row's visible mass (the
    block that crosses it is kept). ``threshold >= 1`` keeps every visible block.

    Args:
        scores: ``(B, H, nQ, nK)`` non-negative block scores.
        visible: bool, broadcastable to ``scores``; invisible blocks are never kept.
        forced: bool, broadcastable; kept first, their mass counts toward tau.
        threshold: float or ``(1, H, 1, 1)`` per-head tensor in (0, 1].

    Returns:
        ``(B, H, nQ, nK)`` bool selection.

    Example:
        >>> s = torch.tensor([[[[0.1, 0.6, 0.3]]]])
        >>> select_blocks(s, visible=torch.ones_like(s, dtype=torch.bool),
        ...               forced=torch.zeros_like(s, dtype=torch.bool), threshold=0.8)
        tensor([[[[False,  True,  True]]]])
    """
    visible = visible.expand_as(scores)
    forced = forced.expand_as(scores) & visible
    tau = torch.as_tensor(threshold, dtype=torch.float32, device=scores.device)
    selected = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    for rows in _row_chunks(scores.shape):
        selected[:, :, rows] = _select_rows(scores[:, :, rows], visible[:, :, rows], forced[:, :, rows], tau)
    return selected


def _select_rows(scores, visible, forced, tau):
    mass = scores.float().masked_fill(~visible, 0.0)
    total = mass.sum(-1, keepdim=True)
    forced_mass = mass.masked_fill(~forced, 0.0).sum(-1, keepdim=True)
    # Candidates sorted by score; non-candidates get -1 so they sort last.
    candidate = visible & ~forced
    ranked, order = mass.masked_fill(~candidate, -1.0).sort(dim=-1, descending=True, stable=True)
    ranked_mass = ranked.clamp_min(0.0)
    mass_before = ranked_mass.cumsum(-1) - ranked_mass
    keep_ranked = (ranked >= 0) & (forced_mass + mass_before < tau * total)
    keep = torch.zeros_like(candidate).scatter(-1, order, keep_ranked)
    # tau >= 1 keeps every visible block by rule: a float cumsum stops short of 1.
    return torch.where(tau >= 1.0, visible, keep | forced)


def to_kv_blocks(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, H, nQ, nK)`` bool to FlexAttention's ``kv_num_blocks`` ``(B, H, nQ)``
    and ``kv_indices`` ``(B, H, nQ, nK)`` int32 (selected blocks first, ascending)."""
    num = selected.sum(-1, dtype=torch.int32)
    indices = torch.empty(selected.shape, dtype=torch.int32, device=selected.device)
    for rows in _row_chunks(selected.shape):
        order = torch.argsort(selected[:, :, rows].to(torch.uint8), dim=-1, descending=True, stable=True)
        indices[:, :, rows] = order
    return num, indices


def select_kv_blocks_reference(
    scores: torch.Tensor,
    *,
    visible: torch.Tensor,
    fully_visible: torch.Tensor | None,
    forced: torch.Tensor,
    threshold: torch.Tensor,
    added: torch.Tensor | None = None,
) -> KVBlocks:
    """:func:`select_blocks`, plus the ``added`` blocks where visible, then
    the kept blocks split into full (entirely visible under the mask) and
    partial, each laid out by :func:`to_kv_blocks` (arguments as in
    ``xflex.attention.selection.select_kv_blocks``)."""
    selected = select_blocks(scores, visible=visible, forced=forced, threshold=threshold)
    if added is not None:
        selected |= added & visible
    return as_kv_blocks(selected, fully_visible)


def as_kv_blocks(selected: torch.Tensor, fully_visible: torch.Tensor | None) -> KVBlocks:
    """``(B, H, nQ, nK)`` selected blocks as :class:`KVBlocks`: those entirely
    visible under the mask (``fully_visible``, broadcastable; None: none) as
    full blocks, the others as partial ones."""
    full = selected & fully_visible if fully_visible is not None else torch.zeros_like(selected)
    return KVBlocks(selected, *to_kv_blocks(selected & ~full), *to_kv_blocks(full))
