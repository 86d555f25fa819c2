"""Stage 3, the BlockMask: a selection in FlexAttention's kv layout plus the
call's mask_mod, built the same way for the forward and the backward."""

from __future__ import annotations

import inspect

import torch
from torch.nn.attention.flex_attention import BlockMask

from .masks import MaskMod

__all__ = ["build_block_mask"]

# torch 2.13 can skip building the q-major copy a backward needs; 2.11 always builds it.
_TAKES_COMPUTE_Q_BLOCKS = "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters


def build_block_mask(
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor,
    full_kv_indices: torch.Tensor,
    *,
    mask_mod: MaskMod | None,
    block_size: int,
    seq_lengths: tuple[int, int],
    for_backward: bool = False,
) -> BlockMask:
    """``BlockMask.from_kv_blocks`` on a selection (``KVBlocks.kv_layout``).

    Args:
        kv_num_blocks, kv_indices: partial blocks, ``(B, H, nQ)`` and ``(B, H, nQ, nK)`` int32.
        full_kv_num_blocks, full_kv_indices: full blocks (no mask_mod), same shapes.
        mask_mod: the call's mask (None: no mask, partial blocks only cut by the ends).
        block_size: square block size.
        seq_lengths: ``(Lq, Lk)``: ragged ends are masked by FlexAttention.
        for_backward: also build the q-major indices a backward pass reads.

    Example:
        >>> num = torch.ones(1, 1, 1, dtype=torch.int32)
        >>> idx = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
        >>> build_block_mask(num, idx, num * 0, idx, mask_mod=None, block_size=128, seq_lengths=(100, 100)).shape
        (1, 1, 100, 100)
    """
    extra = {"compute_q_blocks": for_backward} if _TAKES_COMPUTE_Q_BLOCKS else {}
    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=seq_lengths,
        **extra,
    )
