"""Threshold selection (XAttention, DESIGN section 2): block scores to the set
of key blocks each query block computes, on the scores' device with no host
synchronisation."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

__all__ = ["KVBlocks", "forced_blocks", "select_blocks", "select_kv_blocks", "to_kv_blocks"]

# Query-block rows are independent: work on this many score elements at a
# time so the sort's fp32 values and int64 indices stay a few hundred MiB
# (at 256K tokens and 32 heads the whole (B, H, nQ, nK) sort needs ~2 GiB).
_CHUNK_ELEMENTS = 1 << 25


def _row_chunks(shape: torch.Size) -> list[slice]:
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, shape[0] * shape[1] * shape[3]))
    return [slice(start, start + rows_per_chunk) for start in range(0, shape[2], rows_per_chunk)]


@functools.lru_cache(maxsize=32)
def forced_blocks(
    q_len: int,
    kv_len: int,
    block_size: int,
    *,
    diagonal_offset: int | None,
    keep_sink: bool,
    keep_recent: int,
    device: torch.device,
) -> torch.Tensor:
    """``(1, 1, nQ, nK)`` bool: blocks kept whatever their score.

    The diagonal is the key blocks holding positions ``q + diagonal_offset`` for
    the block's queries (widened by ``keep_recent`` tokens to the left); None
    means the call has no "own position" (cross-attention). The sink is key
    block 0. Cached per shape (every call needs it): the returned tensor is
    shared, never modify it.
    """
    n_q, n_k = math.ceil(q_len / block_size), math.ceil(kv_len / block_size)
    kv_block = torch.arange(n_k, device=device)[None, :]
    forced = torch.zeros((n_q, n_k), dtype=torch.bool, device=device)
    if diagonal_offset is not None:
        q_lo = torch.arange(n_q, device=device)[:, None] * block_size
        q_hi = torch.clamp(q_lo + block_size - 1, max=q_len - 1)
        first = torch.div(q_lo + diagonal_offset - keep_recent, block_size, rounding_mode="floor")
        last = torch.div(q_hi + diagonal_offset, block_size, rounding_mode="floor")
        forced |= (kv_block >= first) & (kv_block <= last)
    if keep_sink:
        forced |= kv_block == 0
    return forced[None, None]


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


class KVBlocks(NamedTuple):
    """A block selection and its FlexAttention layout (``BlockMask.from_kv_blocks``'s
    first four arguments): partial blocks carry the mask_mod, full blocks skip it."""

    selected: torch.Tensor
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor


def select_kv_blocks(
    scores: torch.Tensor,
    *,
    visible: torch.Tensor,
    fully_visible: torch.Tensor | None,
    forced: torch.Tensor,
    threshold: torch.Tensor,
    use_triton: bool,
) -> KVBlocks:
    """:func:`select_blocks`, then the kept blocks split into full (entirely
    visible under the mask) and partial, each laid out by :func:`to_kv_blocks`.

    Args:
        scores, visible, forced: as in :func:`select_blocks`.
        fully_visible: bool, broadcastable to ``scores``; None: no full blocks.
        threshold: ``(1, H|1, 1, 1)`` fp32 per-head thresholds.
        use_triton: the fused Triton kernel (``xflex.selection_triton``, CUDA)
            or the torch ops (the reference); the op decides (Triton on CUDA
            when Triton is installed).

    Example:
        >>> s = torch.tensor([[[[0.1, 0.6, 0.3]]]])
        >>> yes = torch.ones_like(s, dtype=torch.bool)
        >>> blocks = select_kv_blocks(s, visible=yes, fully_visible=yes, forced=~yes,
        ...                           threshold=torch.full((1, 1, 1, 1), 0.8), use_triton=False)
        >>> blocks.full_kv_num_blocks, blocks.full_kv_indices
        (tensor([[[2]]], dtype=torch.int32), tensor([[[[1, 2, 0]]]], dtype=torch.int32))
    """
    if use_triton:
        from .selection_triton import select_kv_blocks_triton

        return KVBlocks(
            *select_kv_blocks_triton(
                scores, visible=visible, fully_visible=fully_visible, forced=forced, threshold=threshold
            )
        )
    selected = select_blocks(scores, visible=visible, forced=forced, threshold=threshold)
    full = selected & fully_visible if fully_visible is not None else torch.zeros_like(selected)
    return KVBlocks(selected, *to_kv_blocks(selected & ~full), *to_kv_blocks(full))
