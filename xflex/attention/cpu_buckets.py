"""FlexAttention on the CPU at a bounded number of compiled shapes.

CPU Inductor compiles FlexAttention once per shape (it cannot build the kernel
for dynamic shapes with a captured mask tensor, see ``flex.py``), so a model
serving many sequence lengths would compile a kernel for each. Here a call is
zero-padded to a bucket, a power-of-two number of blocks, and run with its
selection laid out at the bucket's size: padded query blocks compute nothing,
padded keys are masked, and the output is cut back. A model then compiles one
kernel per bucket and mask kind, whatever lengths it sees.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .block_mask import build_block_mask
from .flex import run_flex_attention
from .pattern import CallPattern

__all__ = ["bucket_length", "bucketed_flex_attention", "padded_kv_layout"]


def bucket_length(length: int, block_size: int) -> int:
    """The padded length of a ``length``-token axis: a power-of-two number of blocks."""
    blocks = max(1, math.ceil(length / block_size))
    return block_size * (1 << (blocks - 1).bit_length())


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.pad(x, (0, size - x.shape[-1]))


def padded_kv_layout(
    kv_layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    n_q_blocks: int,
    n_kv_blocks: int,
    ragged_kv_block: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A selection's kv layout (``KVBlocks.kv_layout``) for inputs padded to
    ``n_q_blocks`` by ``n_kv_blocks`` blocks.

    Padded query blocks get no key block. ``ragged_kv_block``, the last real key
    block when the key length is not a multiple of the block size, holds padded
    keys once padded: where it is a full block it becomes a partial one, so the
    mask_mod hides its padding. Index rows are sorted ascending up to their
    count (``to_kv_blocks``' layout), so that block, the largest real index, is
    the last full entry and is appended last to the partial ones.
    """
    kv_num, kv_idx, full_num, full_idx = kv_layout
    if ragged_kv_block is not None:
        last_full = full_idx.gather(-1, (full_num - 1).clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
        moves = (full_num > 0) & (last_full == ragged_kv_block)
        full_num = full_num - moves.to(full_num.dtype)
        kv_idx = _pad_last(kv_idx, kv_idx.shape[-1] + 1)  # room for the appended block
        appended = torch.where(moves, ragged_kv_block, kv_idx.gather(-1, kv_num.long().unsqueeze(-1)).squeeze(-1))
        kv_idx = kv_idx.scatter(-1, kv_num.long().unsqueeze(-1), appended.to(kv_idx.dtype).unsqueeze(-1))
        kv_num = kv_num + moves.to(kv_num.dtype)
    q_pad = n_q_blocks - kv_num.shape[-1]
    kv_num, full_num = (F.pad(t, (0, q_pad)) for t in (kv_num, full_num))
    kv_idx, full_idx = (F.pad(_pad_last(t, n_kv_blocks)[..., :n_kv_blocks], (0, 0, 0, q_pad)) for t in (kv_idx, full_idx))
    return kv_num, kv_idx, full_num, full_idx


def bucketed_flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    pattern: CallPattern,
    kv_layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    block_size: int,
    scale: float | None,
) -> torch.Tensor:
    """FlexAttention over a selection (``KVBlocks.kv_layout`` at the call's
    real lengths) with q, k and v padded to :func:`bucket_length`; the same
    result as at the real lengths.

    Example:
        >>> p = xflex.plan(q, k, is_causal=True)                                    # doctest: +SKIP
        >>> out = bucketed_flex_attention(q, k, v, pattern=p.pattern, kv_layout=p.blocks.kv_layout,
        ...                               block_size=128, scale=None)               # doctest: +SKIP
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    padded_q, padded_kv = bucket_length(q_len, block_size), bucket_length(kv_len, block_size)
    ragged = kv_len // block_size if kv_len % block_size else None
    layout = padded_kv_layout(
        kv_layout, n_q_blocks=padded_q // block_size, n_kv_blocks=padded_kv // block_size, ragged_kv_block=ragged
    )
    mask_mod, score_mod = pattern.padded_mods(padded_q, padded_kv)
    block_mask = build_block_mask(*layout, mask_mod=mask_mod, block_size=block_size, seq_lengths=(padded_q, padded_kv))
    pad = lambda x, length: F.pad(x, (0, 0, 0, length - x.shape[2]))  # noqa: E731
    out = run_flex_attention(
        pad(query, padded_q), pad(key, padded_kv), pad(value, padded_kv), block_mask=block_mask, score_mod=score_mod, scale=scale
    )
    return out[:, :, :q_len]
