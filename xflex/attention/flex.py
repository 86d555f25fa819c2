"""Stage 4, attention: FlexAttention over the selected blocks, compiled once
per device type and kernel and shared by every call.

Two kernels: FlexAttention's Triton template (everywhere) and its FLASH
backend (FlashAttention-4's CuTeDSL kernels: Hopper and newer, with the
optional ``flash-attn-4`` package). On the H200 a computed block costs
0.90-1.08x of cuDNN's dense time per block with FLASH and 0.57-0.73x with
Triton (bench/RESULTS.md, "Attention kernels"), so ``"auto"`` takes FLASH
wherever it can run the call and Triton elsewhere."""

from __future__ import annotations

import collections
import functools
import importlib.util
import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from ..torch_internals import (
    compile_fx,
    eager_dispatch_state,
    flex_attention_backward_graph,
    flex_attention_backward_inputs,
    recompile_limits,
)
from .masks import Mod, ScoreMod

__all__ = [
    "ATTENTION_KERNELS",
    "AttentionKernel",
    "KernelName",
    "attention_kernel",
    "check_block_size",
    "flash_unsupported_reason",
    "flex_attention_backward",
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
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Compiled FlexAttention of ``query`` ``(B, Hq, Lq, D)`` against ``key`` /
    ``value`` ``(B, Hkv, Lk, D|Dv)`` over ``block_mask``'s blocks (GQA when the
    head counts differ). Callable from eager code and from inside a custom op.
    With ``return_lse``: ``(out, lse)``, the rows' natural-log log-sum-exp
    ``(B, Hq, Lq)`` fp32 that :func:`flex_attention_backward` takes.

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
        result = compiled(
            query,
            key,
            value,
            score_mod=score_mod,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=query.shape[1] != key.shape[1],
            return_aux=AuxRequest(lse=True) if return_lse else None,
        )
    return (result[0], result[1].lse) if return_lse else result


def _mod_key(fn: Callable[..., torch.Tensor]) -> tuple[object, ...]:
    """What a mask_mod / score_mod computes, for the compiled-backward cache:
    its code and the constants it closes over (causal_mask's offset)."""
    cells = tuple(cell.cell_contents for cell in fn.__closure__ or ())
    if any(isinstance(cell, torch.Tensor) for cell in cells):
        raise ValueError(f"{fn.__name__} closes over a tensor: pass it as a buffer (attention.masks.Mod)")
    return (fn.__code__, cells)


def _tensor_key(tensor: torch.Tensor) -> tuple[object, ...]:
    return (tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device)


# One compiled backward per (shapes, strides, mask, score_mod): a training run
# at a few lengths compiles a few; the bound keeps long-running servers of
# many lengths from holding every kernel they ever compiled.
_COMPILED_BACKWARDS: collections.OrderedDict[tuple, Callable] = collections.OrderedDict()
_MAX_COMPILED_BACKWARDS = 64


def flex_attention_backward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    block_mask: BlockMask,
    mask: Mod | None = None,
    score: Mod | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`run_flex_attention` (Triton kernel) from its saved
    ``out`` and ``lse`` (``return_lse=True``): FlexAttention's own backward
    over ``block_mask``'s blocks, without running the forward again.
    Compiled once per shape on CUDA; FlexAttention has no CPU backward.

    Args:
        query, key, value: the forward's inputs; ``out``, ``lse``: its outputs.
        grad_out: the gradient of ``out``.
        block_mask: the forward's BlockMask, built with its q-major indices
            (``build_block_mask(..., for_backward=True)``).
        mask: the forward's mask_mod with its tensors (None: ``block_mask``'s own).
        score: the forward's score_mod with its tensors (None: none).
        scale: the forward's softmax scale (None: ``1/sqrt(E)``).

    Returns:
        ``(dq, dk, dv)`` shaped like ``query``, ``key``, ``value``.

    Example:
        >>> out, lse = run_flex_attention(q, k, v, block_mask=mask, return_lse=True)  # doctest: +SKIP
        >>> dq, dk, dv = flex_attention_backward(q, k, v, out, lse, grad, block_mask=mask)  # doctest: +SKIP
    """
    if not query.is_cuda:
        raise ValueError(f"flex_attention_backward needs CUDA tensors (FlexAttention has no CPU backward), got {query.device}")
    mask = mask if mask is not None else Mod(block_mask.mask_mod)
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    tensors = [t.contiguous() for t in (query, key, value, out, lse, grad_out)]
    inputs = flex_attention_backward_inputs(
        *tensors, block_mask=block_mask, mask_buffers=mask.buffers, score_buffers=() if score is None else score.buffers
    )
    layout_constants = tuple(e for e in block_mask.as_tuple()[:-1] if not isinstance(e, torch.Tensor))
    key_ = (
        tuple(_tensor_key(t) for t in inputs),
        layout_constants,
        _mod_key(mask.fn),
        None if score is None else _mod_key(score.fn),
        scale,
    )
    compiled = _COMPILED_BACKWARDS.get(key_)
    with eager_dispatch_state():
        if compiled is None:
            graph = flex_attention_backward_graph(
                *tensors,
                block_mask=block_mask,
                mask_fn=mask.fn,
                mask_buffers=mask.buffers,
                score_fn=None if score is None else score.fn,
                score_buffers=() if score is None else score.buffers,
                scale=scale,
            )
            compiled = compile_fx(graph, inputs, config_patches={})
            _COMPILED_BACKWARDS[key_] = compiled
            while len(_COMPILED_BACKWARDS) > _MAX_COMPILED_BACKWARDS:
                _COMPILED_BACKWARDS.popitem(last=False)
        _COMPILED_BACKWARDS.move_to_end(key_)
        dq, dk, dv = compiled(*inputs)
    return dq, dk, dv
