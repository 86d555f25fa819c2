"""SDPA's masking semantics as FlexAttention mask_mods/score_mods, and the
block-level view of each (which blocks a mask leaves visible, which it leaves
whole), so that selection and attention agree on what a call means."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = [
    "MaskMod",
    "ScoreMod",
    "BlockVisibility",
    "Mod",
    "lookup_mask",
    "add_bias",
    "causal_mask",
    "boolean_mask",
    "additive_bias",
    "key_length_mask",
    "visible_everywhere",
    "causal_block_visibility",
    "tensor_block_visibility",
]

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class BlockVisibility(NamedTuple):
    """``(B|1, H|1, nQ, nK)`` bool views of a mask at block granularity.

    ``any``: some (query, key) pair in the block is visible, so the block may be
    computed. ``all``: every in-range pair is visible, so the block can skip the
    mask_mod ("full" block in FlexAttention terms).
    """

    any: torch.Tensor
    all: torch.Tensor


def causal_mask(offset: int) -> MaskMod:
    """Key ``kv`` visible from query ``q`` when ``kv <= q + offset``: offset 0 is
    SDPA's top-left ``is_causal``, ``Lk - Lq`` the bottom-right (KV prefix) form."""

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    causal.__name__ = f"causal_offset_{offset}"
    return causal


@dataclasses.dataclass(frozen=True)
class Mod:
    """A mask_mod or score_mod kept apart from the tensors it reads:
    ``fn(*indices, *buffers)``. FlexAttention's forward takes the closure
    :attr:`bound`; the backward graph (``attention.flex``) takes ``fn`` and
    ``buffers`` as inputs, so that one compiled backward serves every call of
    the same shapes instead of baking one mask in.

    Example:
        >>> mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
        >>> Mod(lookup_mask, (mask,)).bound(0, 0, 1, 2)
        tensor(True)
    """

    fn: Callable[..., torch.Tensor]
    buffers: tuple[torch.Tensor, ...] = ()

    @functools.cached_property
    def bound(self) -> Callable[..., torch.Tensor]:
        if not self.buffers:
            return self.fn
        fn, buffers = self.fn, self.buffers

        def with_buffers(*indices):
            return fn(*indices, *buffers)

        return with_buffers


def lookup_mask(b, h, q_idx, kv_idx, mask):
    """An SDPA boolean ``attn_mask`` already expanded to ``(B, H, Lq, Lk)`` (True = attend)."""
    return mask[b, h, q_idx, kv_idx]


def add_bias(score, b, h, q_idx, kv_idx, bias):
    """An SDPA float ``attn_mask`` (``(B, H, Lq, Lk)``, expanded) added to the scores;
    ``-inf`` entries mask, anything else (ALiBi, relative bias) shifts."""
    return score + bias[b, h, q_idx, kv_idx].to(score.dtype)


def boolean_mask(mask: torch.Tensor) -> MaskMod:
    """:func:`lookup_mask` of ``mask`` as a mask_mod."""
    return Mod(lookup_mask, (mask,)).bound


def additive_bias(bias: torch.Tensor) -> ScoreMod:
    """:func:`add_bias` of ``bias`` as a score_mod."""
    return Mod(add_bias, (bias,)).bound


def visible_everywhere(b, h, q_idx, kv_idx):
    """Every key visible, written so that FlexAttention does not recognise it
    as "no mask": its FLASH kernel skips the block structure of a BlockMask
    whose mask_mod is the default one (bench/RESULTS.md, "Attention kernels")."""
    return kv_idx >= 0


def key_length_mask(kv_len: torch.Tensor) -> MaskMod:
    """Keys at positions below ``kv_len`` (a 0-d tensor, so that compiled
    kernels take it as an input instead of baking one length in)."""

    def within_length(b, h, q_idx, kv_idx):
        return kv_idx < kv_len

    return within_length


def _block_ranges(length: int, block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(0, math.ceil(length / block_size), device=device) * block_size
    return start, torch.clamp(start + block_size - 1, max=length - 1)


@functools.lru_cache(maxsize=32)
def causal_block_visibility(
    q_len: int, kv_len: int, block_size: int, offset: int, device: torch.device
) -> BlockVisibility:
    """Block view of :func:`causal_mask`, by index arithmetic (no ``L x L`` work).

    Cached per shape (every causal call needs it; a handful of kernel launches
    saved per call): the returned tensors are shared, never modify them."""
    q_lo, q_hi = _block_ranges(q_len, block_size, device)
    kv_lo, kv_hi = _block_ranges(kv_len, block_size, device)
    any_visible = kv_lo[None, :] <= q_hi[:, None] + offset
    all_visible = kv_hi[None, :] <= q_lo[:, None] + offset
    return BlockVisibility(any_visible[None, None], all_visible[None, None])


def tensor_block_visibility(visible: torch.Tensor, block_size: int) -> BlockVisibility:
    """Block view of an element-wise visibility tensor ``(B|1, H|1, Lq, Lk)``
    (one pass over it; broadcast batch and head dims stay broadcast)."""
    Bm, Hm, Lq, Lk = visible.shape
    n_q, n_k = math.ceil(Lq / block_size), math.ceil(Lk / block_size)
    pad_q, pad_k = n_q * block_size - Lq, n_k * block_size - Lk
    padded = torch.nn.functional.pad(visible.to(torch.uint8), (0, pad_k, 0, pad_q), value=2)
    blocks = padded.view(Bm, Hm, n_q, block_size, n_k, block_size)
    # Padding is 2: it never makes a block "any" visible and never spoils "all".
    any_visible = (blocks == 1).any(5).any(3)
    all_visible = (blocks != 0).all(5).all(3)
    return BlockVisibility(any_visible, all_visible)
