"""Stage 2, selection: block scores to the key blocks each query block
computes (XAttention's threshold rule: per query block, the forced blocks plus
the fewest others whose estimated mass reaches tau), laid out as FlexAttention
takes them. ``reference`` is plain torch, ``triton_kernel`` one fused kernel;
:func:`select_kv_blocks` picks one (the same blocks from each)."""

from __future__ import annotations

import torch

from ..backends import Backend, uses_triton
from .blocks import KVBlocks, forced_blocks, text_token_blocks
from .reference import as_kv_blocks, select_blocks, select_kv_blocks_reference, to_kv_blocks

__all__ = [
    "KVBlocks",
    "as_kv_blocks",
    "forced_blocks",
    "select_blocks",
    "select_kv_blocks",
    "text_token_blocks",
    "to_kv_blocks",
]


def select_kv_blocks(
    scores: torch.Tensor,
    *,
    visible: torch.Tensor,
    fully_visible: torch.Tensor | None,
    forced: torch.Tensor,
    threshold: torch.Tensor,
    added: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> KVBlocks:
    """Threshold selection, then the kept blocks split into full (entirely
    visible under the mask: no mask_mod) and partial, in FlexAttention's kv layout.

    Args:
        scores: ``(B, H, nQ, nK)`` non-negative block scores.
        visible: bool, broadcastable to ``scores``; invisible blocks are never kept.
        fully_visible: bool, broadcastable; None: no full blocks.
        forced: bool, broadcastable; kept first, their mass counts toward tau.
        threshold: ``(1, H|1, 1, 1)`` fp32 per-head thresholds in (0, 1].
        added: bool, broadcastable, or None; kept where visible after the cut,
            which is made as without them (their mass does not count toward
            tau): vertical lines, a joint call's text blocks.
        backend: ``"torch"`` (the reference), ``"triton"`` / ``"gluon"`` (the
            Triton kernel), ``"auto"`` (Triton on CUDA when installed).

    Returns:
        :class:`KVBlocks`.

    Example:
        >>> s = torch.tensor([[[[0.1, 0.6, 0.3]]]])
        >>> yes = torch.ones_like(s, dtype=torch.bool)
        >>> blocks = select_kv_blocks(s, visible=yes, fully_visible=yes, forced=~yes,
        ...                           threshold=torch.full((1, 1, 1, 1), 0.8))
        >>> blocks.full_kv_num_blocks, blocks.full_kv_indices
        (tensor([[[2]]], dtype=torch.int32), tensor([[[[1, 2, 0]]]], dtype=torch.int32))
    """
    kwargs = dict(visible=visible, fully_visible=fully_visible, forced=forced, threshold=threshold, added=added)
    if uses_triton(backend, scores):
        from .triton_kernel import select_kv_blocks_triton

        return select_kv_blocks_triton(scores, **kwargs)
    return select_kv_blocks_reference(scores, **kwargs)
