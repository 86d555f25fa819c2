"""What one SDPA call means, in the terms selection and FlexAttention need:
mask_mod/score_mod, block visibility, and the causal alignment for scoring."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import and_masks

from .masks import (
    BlockVisibility,
    MaskMod,
    ScoreMod,
    additive_bias,
    boolean_mask,
    causal_block_visibility,
    causal_mask,
    key_length_mask,
    tensor_block_visibility,
)

__all__ = ["CallPattern", "call_pattern"]


@dataclasses.dataclass
class CallPattern:
    """Attributes:
    mask_mod, score_mod: carry the call's mask into FlexAttention (None: none).
    visibility: which blocks the mask leaves visible / entirely visible.
    causal_offset: reduced-space causal mask for the scorer (None: not causal).
    diagonal_offset: key position of a query's own position is ``q + offset``
        (None: no such notion, e.g. cross-attention).
    causal: the call is causal-like (is_causal, or an explicit mask with a
        query axis), so the sink block applies.
    captures_tensors: mask_mod/score_mod read captured tensors.
    shape: ``(B, Hq, Lq, Lk)`` of the call.
    attn_mask: the call's own mask, 4-D as given (None for ``is_causal`` or no mask).
    """

    mask_mod: MaskMod | None
    score_mod: ScoreMod | None
    visibility: BlockVisibility
    causal_offset: int | None
    diagonal_offset: int | None
    causal: bool
    captures_tensors: bool
    shape: tuple[int, int, int, int]
    attn_mask: torch.Tensor | None = None

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
            mask_mod=causal_mask(0),
            score_mod=None,
            visibility=causal_block_visibility(Lq, Lk, block_size, 0, query.device),
            causal_offset=0,
            diagonal_offset=0,
            causal=True,
            captures_tensors=False,
            shape=(B, Hq, Lq, Lk),
        )
    if attn_mask is None:
        everything = torch.ones(
            (1, 1, math.ceil(Lq / block_size), math.ceil(Lk / block_size)), dtype=torch.bool, device=query.device
        )
        return CallPattern(
            mask_mod=None,
            score_mod=None,
            visibility=BlockVisibility(everything, everything),
            causal_offset=None,
            diagonal_offset=0 if Lq == Lk else None,
            causal=False,
            captures_tensors=False,
            shape=(B, Hq, Lq, Lk),
        )
    mask = _as_4d(attn_mask)
    full_shape = (B, Hq, Lq, Lk)
    if mask.dtype == torch.bool:
        visible = mask
        mask_mod, score_mod = boolean_mask(mask.expand(full_shape)), None
    else:
        visible = mask != float("-inf")
        mask_mod, score_mod = None, additive_bias(mask.expand(full_shape))
    # A mask without a query axis only hides keys (padding): the call is
    # bidirectional. A full (Lq, Lk) mask is taken as causal-like (Hugging Face
    # LLMs), and with Lq < Lk as a KV prefix (chunked prefill): a query's own
    # position is bottom-right aligned.
    keys_only = mask.shape[-2] == 1
    visible = visible.expand(visible.shape[0], visible.shape[1], Lq, Lk)
    return CallPattern(
        mask_mod=mask_mod,
        score_mod=score_mod,
        visibility=tensor_block_visibility(visible, block_size),
        causal_offset=None,
        diagonal_offset=(0 if Lq == Lk else None) if keys_only else Lk - Lq,
        causal=not keys_only,
        captures_tensors=True,
        shape=(B, Hq, Lq, Lk),
        attn_mask=mask,
    )
