"""``fp8.fp8_per_head``'s rounding in one Triton pass on CUDA: read x once,
write e4m3. The torch ops (``|x|``, a scaled copy, the cast) made the whole
fp8 estimate at 128K take 14.2 ms against 10.5 ms with this kernel, whose
rounding of q and k costs 0.9 ms there (bench/RESULTS.md, "FP8 scoring")."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["round_to_e4m3"]


@triton.jit
def _round_kernel(x_ptr, out_ptr, scale_ptr, sb, sh, sl, sd, num_heads, length, HEAD_DIM: tl.constexpr,
                  BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < length) & (cols[None, :] < HEAD_DIM)
    base = (bh // num_heads).to(tl.int64) * sb + (bh % num_heads).to(tl.int64) * sh
    x = tl.load(x_ptr + base + rows[:, None].to(tl.int64) * sl + cols[None, :] * sd, mask=mask).to(tl.float32)
    scaled = x * tl.load(scale_ptr + bh)  # a power of two: exact, at most 448 in magnitude
    out = out_ptr + bh.to(tl.int64) * length * HEAD_DIM + rows[:, None].to(tl.int64) * HEAD_DIM + cols[None, :]
    tl.store(out, scaled.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=mask)


def round_to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(x * scale[b, h]).to(torch.float8_e4m3fn)``, contiguous, for CUDA ``x``
    (B, H, L, D) of any strides and fp32 powers of two ``scale`` (B, H)."""
    B, H, L, D = x.shape
    out = torch.empty((B, H, L, D), dtype=torch.float8_e4m3fn, device=x.device)
    block_d = triton.next_power_of_2(D)
    block_l = max(1, 8192 // block_d)
    _round_kernel[(triton.cdiv(L, block_l), B * H)](
        x, out, scale.contiguous(), *x.stride(), H, L, HEAD_DIM=D, BLOCK_L=block_l, BLOCK_D=block_d
    )
    return out
