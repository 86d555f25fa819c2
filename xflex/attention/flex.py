"""Stage 4, attention: FlexAttention over the selected blocks, compiled once
per device type and kernel and shared by every call.

Two kernels: FlexAttention's Triton template (everywhere) and its FLASH
backend (FlashAttention-4's CuTeDSL kernels: Hopper and newer, with the
optional ``flash-attn-4`` package). On the H200 a computed block costs
0.90-1.08x of cuDNN's dense time per block with FLASH and 0.57-0.73x with
Triton (bench/RESULTS.md, "Attention kernels"), so ``"auto"`` takes FLASH
wherever it can run the call and Triton elsewhere."""

from __future__ import annotations

import functools
import importlib.util
from typing import Literal, get_args

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..torch_internals import eager_dispatch_state, recompile_limits
from .masks import ScoreMod

__all__ = [
    "ATTENTION_KERNELS",
    "AttentionKernel",
    "KernelName",
    "attention_kernel",
    "check_block_size",
    "flash_unsupported_reason",
    "run_flex_attention",
]

KernelName = Literal["triton", "flash"]
"""A kernel that runs: FlexAttention's Triton kernel or its FLASH backend."""
AttentionKernel = Literal["auto", "triton", "flash"]
"""``"auto"``: FLASH where it can run the call (``flash_unsupported_reason``
is None), else Triton. ``"triton"``: always Triton. ``"flash"``: FLASH, an
error where it cannot run."""
ATTENTION_KERNELS: tuple[str, ...] = get_args(AttentionKernel)
# What the FLASH path was tested with (tests/test_flash_attention.py, passed on an H200).
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_HEAD_DIMS = (64, 128)
_FLASH_BLOCK_SIZE = 128  # FlashAttention-4's tile: a BlockMask's blocks must match it
# FlexAttention's CUDA template tiles 128 query rows; on an H200 block_size 64
# failed inside Inductor ("Q and KV block size must be divisible by BLOCK_M and BLOCK_N").
_CUDA_BLOCK_MULTIPLE = 128


def _flex_cpu(*args, **kwargs):
    return flex_attention(*args, **kwargs)


def _flex_cuda(*args, **kwargs):
    return flex_attention(*args, **kwargs)


def _flex_cuda_flash(*args, **kwargs):
    return flex_attention(*args, kernel_options={"BACKEND": "FLASH"}, **kwargs)


# FlexAttention only runs its block-sparse kernel when compiled (eager
# flex_attention ignores the block structure). CPU Inductor (2.13) emits C++
# that does not build for flex with dynamic shapes and a captured mask tensor,
# so the CPU compiles one kernel per shape (attention/cpu_buckets.py bounds
# them); the FLASH template takes static shapes only (each new length compiles
# once). One wrapper function per entry keeps the compile caches apart.
_COMPILED_FLEX = {
    ("cpu", "triton"): torch.compile(_flex_cpu, fullgraph=True, dynamic=False),
    ("cuda", "triton"): torch.compile(_flex_cuda, fullgraph=True),
    ("cuda", "flash"): torch.compile(_flex_cuda_flash, fullgraph=True, dynamic=False),
}


def check_block_size(device: torch.device, block_size: int) -> None:
    """Raise a ValueError naming ``block_size`` where FlexAttention's kernels
    for ``device`` cannot take it (CUDA: multiples of 128; the CPU takes any).

    Example:
        >>> check_block_size(torch.device("cpu"), 64)
    """
    if device.type == "cuda" and block_size % _CUDA_BLOCK_MULTIPLE:
        raise ValueError(
            f"block_size={block_size} cannot run on CUDA: FlexAttention's GPU kernels tile "
            f"{_CUDA_BLOCK_MULTIPLE} query rows, so block_size must be 128 or 256 there (smaller blocks run on the CPU)"
        )


@functools.cache
def _flash_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and importlib.util.find_spec("flash_attn.cute") is not None


def flash_unsupported_reason(
    query: torch.Tensor, *, key_length: int, value_head_dim: int, block_size: int, captures_tensors: bool, needs_grad: bool
) -> str | None:
    """Why the FLASH kernel cannot run this call (None: it can). Calls outside
    what tests/test_flash_attention.py checked on the GPU count as unsupported."""
    if not query.is_cuda or torch.cuda.get_device_capability(query.device)[0] < 9:
        return "it needs a Hopper or newer GPU"
    if not _flash_installed():
        return "flash-attn-4 is not installed (pip install 'xflex[flash]')"
    if query.dtype not in _FLASH_DTYPES:
        return f"it takes fp16/bf16, not {query.dtype}"
    if query.shape[-1] not in _FLASH_HEAD_DIMS or value_head_dim != query.shape[-1]:
        return f"it was tested with head dims {_FLASH_HEAD_DIMS} (q and v alike), not {query.shape[-1]} / {value_head_dim}"
    if block_size != _FLASH_BLOCK_SIZE:
        return f"its tile needs block_size={_FLASH_BLOCK_SIZE}, not {block_size}"
    if query.shape[0] != 1:
        return f"it was tested with batch 1, not {query.shape[0]}"
    if query.shape[2] != key_length:
        return f"it was tested with equal query and key lengths, not {query.shape[2]} / {key_length}"
    if captures_tensors:
        return "masks that read tensors (attn_mask lookups, biases) are not supported"
    if needs_grad:
        return "its backward is not supported by xflex yet"
    return None


def attention_kernel(
    kernel: AttentionKernel,
    query: torch.Tensor,
    *,
    key_length: int,
    value_head_dim: int,
    block_size: int,
    captures_tensors: bool,
    needs_grad: bool,
) -> KernelName:
    """The kernel that runs this call for the ``attention_kernel`` option
    ``kernel``: ``"auto"`` resolves to FLASH or Triton, ``"flash"`` raises a
    ValueError saying why where it cannot run.

    Example:
        >>> q = torch.randn(1, 2, 256, 64)
        >>> attention_kernel("auto", q, key_length=256, value_head_dim=64, block_size=128, captures_tensors=False, needs_grad=False)
        'triton'
    """
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention_kernel must be one of {ATTENTION_KERNELS}, but got {kernel!r}")
    if kernel == "triton":
        return kernel
    reason = flash_unsupported_reason(
        query,
        key_length=key_length,
        value_head_dim=value_head_dim,
        block_size=block_size,
        captures_tensors=captures_tensors,
        needs_grad=needs_grad,
    )
    if reason is None:
        return "flash"
    if kernel == "flash":
        raise ValueError(f"attention_kernel='flash' cannot run this call: {reason}")
    return "triton"


def run_flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    block_mask: BlockMask,
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
    kernel: KernelName = "triton",
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
    compiled = _COMPILED_FLEX.get((query.device.type, kernel))
    if compiled is None:
        raise ValueError(f"no FlexAttention {kernel} kernel for {query.device.type} tensors; expected one of {sorted(_COMPILED_FLEX)}")
    # Distinct masks, dtypes and layouts each compile once; the default
    # recompile limit (8) would silently fall back to eager flex.
    with eager_dispatch_state(), recompile_limits(256, 4096):
        return compiled(
            query,
            key,
            value,
            score_mod=score_mod,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=query.shape[1] != key.shape[1],
        )
