"""Stage 4, attention: FlexAttention over the selected blocks, compiled once
per device type and shared by every call."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..torch_internals import eager_dispatch_state, recompile_limits
from .masks import ScoreMod

__all__ = ["run_flex_attention"]


def _flex_attention_static(*args, **kwargs):
    return flex_attention(*args, **kwargs)


def _flex_attention_dynamic(*args, **kwargs):
    return flex_attention(*args, **kwargs)


# FlexAttention only runs its block-sparse kernel when compiled (eager
# flex_attention ignores the block structure). CPU Inductor (2.13) emits C++
# that does not build for flex with dynamic shapes and a captured mask tensor,
# so CPU compiles one kernel per shape. Two wrapper functions keep the two
# compile caches apart.
_COMPILED_FLEX = {
    "cpu": torch.compile(_flex_attention_static, fullgraph=True, dynamic=False),
    "cuda": torch.compile(_flex_attention_dynamic, fullgraph=True),
}


def run_flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    block_mask: BlockMask,
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Compiled FlexAttention of ``query`` ``(B, Hq, Lq, D)`` against ``key`` /
    ``value`` ``(B, Hkv, Lk, D|Dv)`` over ``block_mask``'s blocks (GQA when the
    head counts differ). Callable from eager code and from inside a custom op.

    Example:
        >>> from torch.nn.attention.flex_attention import create_block_mask
        >>> q = k = v = torch.randn(1, 2, 256, 64)
        >>> mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, 256, 256, device="cpu")
        >>> run_flex_attention(q, k, v, block_mask=mask).shape
        torch.Size([1, 2, 256, 64])
    """
    if query.device.type not in _COMPILED_FLEX:
        raise ValueError(f"FlexAttention runs on {sorted(_COMPILED_FLEX)} tensors, but got device {query.device}")
    # Distinct masks, dtypes and layouts each compile once; the default
    # recompile limit (8) would silently fall back to eager flex.
    with eager_dispatch_state(), recompile_limits(256, 4096):
        return _COMPILED_FLEX[query.device.type](
            query,
            key,
            value,
            score_mod=score_mod,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=query.shape[1] != key.shape[1],
        )
