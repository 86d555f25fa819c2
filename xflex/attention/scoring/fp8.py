"""FP8 inputs for the scorer: q and k rounded to e4m3 with one power-of-two
scale per (batch, head).

Hopper's tensor cores multiply e4m3 at twice the bf16 rate, and the estimate
is a softmax of logits that are already means of S products: three mantissa
bits move them far less than the gap between blocks kept and dropped
(bench/RESULTS.md, "FP8 scoring"). A power-of-two scale makes the rounding
the only change: ``dequantize(*fp8_per_head(x))`` is exact in bf16 and fp32,
so the plain-torch reference on those values checks the Gluon kernel's fp8
products.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from ..backends import uses_triton

__all__ = ["PRECISIONS", "Precision", "dequantize", "fp8_per_head", "head_scales"]

Precision = Literal["input", "fp8"]
"""What the scorer multiplies: the inputs' own dtype, or their e4m3 rounding."""
PRECISIONS: tuple[str, ...] = get_args(Precision)

E4M3_MAX = 448.0


def fp8_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (B, H, L, D) as e4m3 and the inverse of each head's scale.

    The scale is the largest power of two that keeps the head's largest
    magnitude within e4m3's 448, so nothing saturates; an all-zero head
    takes scale 1. On CUDA with Triton one kernel rounds (``fp8_kernel``),
    elsewhere torch ops; the same values either way.

    Example:
        >>> x = torch.tensor([[[[0.5, -3.0], [1000.0, 0.1]]]])
        >>> x8, inverse = fp8_per_head(x)
        >>> inverse.item(), dequantize(x8, inverse, torch.float32).flatten().tolist()
        (4.0, [0.5, -3.0, 1024.0, 0.1015625])
    """
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (B, H, L, D), but got x.dim()={x.dim()}")
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=(-2, -1)).float()  # one pass, no |x| copy
    exponent = torch.floor(torch.log2(E4M3_MAX / amax)).clamp(-126, 126)
    exponent = torch.where(amax > 0, exponent, 0.0)
    scale = torch.exp2(exponent)
    if uses_triton("auto", x):
        from .fp8_kernel import round_to_e4m3

        return round_to_e4m3(x, scale), torch.exp2(-exponent)
    # fp16 cannot hold the scales of small heads (2^16 overflows): scale those in fp32.
    work = torch.float32 if x.dtype == torch.float16 else x.dtype
    scaled = x.to(work) * scale.to(work)[..., None, None]
    return scaled.to(torch.float8_e4m3fn), torch.exp2(-exponent)


def dequantize(x8: torch.Tensor, inverse_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values ``x8`` stands for, in ``dtype`` (exact for bf16 and fp32)."""
    return x8.to(dtype) * inverse_scale.to(dtype)[..., None, None]


def head_scales(q_inverse: torch.Tensor, k_inverse: torch.Tensor) -> torch.Tensor:
    """Per query head (``B * Hq``, fp32): the factor the products of its fp8
    q and its KV head's fp8 k are multiplied by to be those of the values."""
    group = q_inverse.shape[1] // k_inverse.shape[1]
    return (q_inverse * k_inverse.repeat_interleave(group, dim=1)).reshape(-1).contiguous()
