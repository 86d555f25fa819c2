"""What a selection is (the kept blocks in FlexAttention's kv layout) and the
blocks every selection keeps whatever their score."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

__all__ = ["KVBlocks", "forced_blocks", "text_token_blocks"]


class KVBlocks(NamedTuple):
    """A block selection and its FlexAttention layout (``BlockMask.from_kv_blocks``'s
    first four arguments): partial blocks carry the mask_mod, full blocks skip it."""

    selected: torch.Tensor
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor

    @property
    def kv_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)``."""
        return self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices


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


@functools.lru_cache(maxsize=32)
def text_token_blocks(length: int, block_size: int, *, text_tokens: int, device: torch.device) -> torch.Tensor:
    """``(nBlocks,)`` bool: the blocks of a ``length``-token sequence holding
    one of its first ``text_tokens`` tokens (``text_tokens < 0``: of its last
    ``-text_tokens``), as joint text + video attention places its text.
    Cached per shape: the returned tensor is shared, never modify it.

    Example:
        >>> text_token_blocks(300, 64, text_tokens=-100, device="cpu")
        tensor([False, False, False,  True,  True])
    """
    start = torch.arange(math.ceil(length / block_size), device=device) * block_size
    if text_tokens > 0:
        return start < text_tokens
    return start + block_size > length + text_tokens
