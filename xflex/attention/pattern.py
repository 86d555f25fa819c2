"""What one SDPA call means, in the terms selection and FlexAttention need:
mask_mod/score_mod, block visibility, and the causal alignment for scoring."""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import and_masks

from .masks import (
    BlockVisibility,
    MaskMod,
    Mod,
    ScoreMod,
    add_bias,
    additive_bias,
    boolean_mask,
    causal_block_visibility,
    causal_mask,
    key_length_mask,
    lookup_mask,
    tensor_block_visibility,
)

__all__ = ["CallPattern", "call_pattern"]


@dataclasses.dataclass
class CallPattern:
    """Attributes:
    mask, score: the call's mask as FlexAttention mask_mod / score_mod with
        the tensors they read (None: none); ``mask_mod`` / ``score_mod`` are
        the closures FlexAttention's forward takes.
    visibility: which blocks the mask leaves visible / entirely visible.
    causal_offset: reduced-space causal mask for the scorer (None: not causal).
    diagonal_offset: key position of a query's own position is ``q + offset``
        (None: no such notion, e.g. cross-attention).
    causal: the call's queries may be ordered as a causal call's (is_causal,
        or a mask with a query axis in memory): its last query blocks see the
        most keys (the probes of the adaptive method).
    sink: ``(B|1, H|1, 1, nK)`` bool, key block 0 where the call is causal
        (kept whatever its score, with ``keep_sink``); None: no sink (no
        mask, or one that only hides keys).
    captures_tensors: mask_mod/score_mod read captured tensors.
    shape: ``(B, Hq, Lq, Lk)`` of the call.
    attn_mask: the call's own mask, 4-D as given (None for ``is_causal`` or no mask).
    """

    mask: Mod | None
    score: Mod | None
    visibility: BlockVisibility
    causal_offset: int | None
    diagonal_offset: int | None
    causal: bool
    sink: torch.Tensor | None
    captures_tensors: bool
    shape: tuple[int, int, int, int]
    attn_mask: torch.Tensor | None = None

    @property
    def mask_mod(self) -> MaskMod | None:
        return None if self.mask is None else self.mask.bound

    @property
    def score_mod(self) -> ScoreMod | None:
        return None if self.score is None else self.score.bound

    def padded_mods(self, q_len: int, kv_len: int) -> tuple[MaskMod | None, ScoreMod | None]:
        """``(mask_mod, score_mod)`` for this call's q, k and v zero-padded to
        ``q_len`` queries and ``kv_len`` keys: the call's own mask, with the
        padded keys hidden (rows of padded queries are don't-cares)."""
        B, Hq, real_q_len, real_kv_len = self.shape
        if self.attn_mask is None:
            hide_padding = key_length_mask(torch.tensor(real_kv_len))
            return (hide_padding if self.mask_mod is None else and_masks(self.mask_mod, hide_padding)), None
        mask = self.attn_mask
        pad_q = 0 if mask.shape[-2] == 1 else q_len - real_q_len
        if mask.dtype == torch.bool:
            padded = F.pad(mask, (0, kv_len - real_kv_len, 0, pad_q), value=False)
            return boolean_mask(padded.expand(B, Hq, q_len, kv_len)), None
        padded = F.pad(mask, (0, kv_len - real_kv_len, 0, pad_q), value=float("-inf"))
        return None, additive_bias(padded.expand(B, Hq, q_len, kv_len))


@functools.lru_cache(maxsize=32)
def _first_key_block(kv_len: int, block_size: int, device: torch.device) -> torch.Tensor:
    """``(1, 1, 1, nK)``: key block 0. Cached per shape: shared, never modify it."""
    return (torch.arange(math.ceil(kv_len / block_size), device=device) == 0).view(1, 1, 1, -1)


def _causal_sink(visible: torch.Tensor, q_len: int, kv_len: int, block_size: int) -> torch.Tensor:
    """Key block 0 where a mask with a query axis is causal, i.e. hides every
    key block wholly after its query block's last position (bottom-right
    aligned): ``(B|1, H|1, 1, nK)``, decided on the device (no host sync).

    A padding mask over (query, key) pairs (HunyuanVideo's text refiner)
    shows real queries the keys after them, so it gets no sink."""
    device = visible.device
    ahead = ~causal_block_visibility(q_len, kv_len, block_size, kv_len - q_len, device).any
    causal = ~(visible & ahead).any(-1, keepdim=True).any(-2, keepdim=True)
    return causal & _first_key_block(kv_len, block_size, device)


def _as_4d(mask: torch.Tensor) -> torch.Tensor:
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def call_pattern(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    block_size: int,
) -> CallPattern:
    """Translate SDPA's ``attn_mask``/``is_causal`` for 4-D ``query`` ``(B, Hq, Lq, D)``
    and ``key`` ``(B, Hkv, Lk, D)``."""
    B, Hq, Lq, _ = query.shape
    Lk = key.shape[2]
    if is_causal:
        # SDPA's is_causal is top-left aligned, also when Lq != Lk.
        return CallPattern(
            mask=Mod(causal_mask(0)),
            score=None,
            visibility=causal_block_visibility(Lq, Lk, block_size, 0, query.device),
            causal_offset=0,
            diagonal_offset=0,
            causal=True,
            sink=_first_key_block(Lk, block_size, query.device),
            captures_tensors=False,
            shape=(B, Hq, Lq, Lk),
        )
    if attn_mask is None:
        everything = torch.ones(
            (1, 1, math.ceil(Lq / block_size), math.ceil(Lk / block_size)), dtype=torch.bool, device=query.device
        )
        return CallPattern(
            mask=None,
            score=None,
            visibility=BlockVisibility(everything, everything),
            causal_offset=None,
            diagonal_offset=0 if Lq == Lk else None,
            causal=False,
            sink=None,
            captures_tensors=False,
            shape=(B, Hq, Lq, Lk),
        )
    mask = _as_4d(attn_mask)
    full_shape = (B, Hq, Lq, Lk)
    if mask.dtype == torch.bool:
        visible = mask
        mask_with, score_with = Mod(lookup_mask, (mask.expand(full_shape),)), None
    else:
        visible = mask != float("-inf")
        mask_with, score_with = None, Mod(add_bias, (mask.expand(full_shape),))
    # A mask whose query axis is absent or broadcast (stride 0, as Hugging
    # Face expands key-padding masks) only hides keys: the call is
    # bidirectional, known from the shape alone. A query axis in memory may be
    # causal (Hugging Face LLMs; with Lq < Lk a KV prefix, so a query's own
    # position is bottom-right aligned) or padding over (query, key) pairs:
    # the sink tells them apart from the block visibility, on the device.
    keys_only = mask.shape[-2] == 1 or mask.stride(-2) == 0
    visible = visible.expand(visible.shape[0], visible.shape[1], Lq, Lk)
    visibility = tensor_block_visibility(visible, block_size)
    return CallPattern(
        mask=mask_with,
        score=score_with,
        visibility=visibility,
        causal_offset=None,
        diagonal_offset=(0 if Lq == Lk else None) if keys_only else Lk - Lq,
        causal=not keys_only,
        sink=None if keys_only else _causal_sink(visibility.any, Lq, Lk, block_size),
        captures_tensors=True,
        shape=(B, Hq, Lq, Lk),
        attn_mask=mask,
    )
