"""The run-time xflex attention op: what every rewritten SDPA call becomes.

It reads the active settings when it runs, decides dense fallbacks from the
actual inputs, and otherwise goes scorer -> selection -> BlockMask ->
FlexAttention. It is an opaque custom op so that Inductor keeps it whole and
so that run-time settings never reach a graph guard.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .calibration import Calibration, active_calibrations, sample_query_blocks, sampled_block_mass
from .config import Config
from .context import effective_config, record_call, recording
from .pattern import CallPattern, call_pattern
from .score_mods import antidiagonal_block_scores
from .selection import KVBlocks, forced_blocks, select_blocks, select_kv_blocks
from .stats import CallRecord

__all__ = ["sparse_sdpa", "dense_reason", "plan_blocks", "select_for_call"]

_SPARSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FROM_KV_BLOCKS_TAKES_COMPUTE_Q = "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters


def _flex_attention_static(*args, **kwargs):
    return flex_attention(*args, **kwargs)


def _flex_attention_dynamic(*args, **kwargs):
    return flex_attention(*args, **kwargs)


# Compiled once and shared: FlexAttention only runs its block-sparse kernel
# when compiled (eager flex_attention ignores the block structure). CPU
# Inductor (2.13) emits C++ that does not build for flex with dynamic shapes
# and a captured mask tensor, so CPU compiles one kernel per shape. Two
# wrapper functions keep the two compile caches apart.
_COMPILED_FLEX = {
    "cpu": torch.compile(_flex_attention_static, fullgraph=True, dynamic=False),
    "cuda": torch.compile(_flex_attention_dynamic, fullgraph=True),
}

# A custom op's kernel runs with every dispatch key above the backend
# excluded; compiling flex_attention (functionalization, vmap) needs the
# ordinary eager state back. Captured at import, outside any op.
_EAGER_DISPATCH_STATE = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())


@contextlib.contextmanager
def _eager_dispatch_state() -> Iterator[None]:
    with torch._C._ForceDispatchKeyGuard(*_EAGER_DISPATCH_STATE):
        yield


def _run_flex(query, key, value, *, block_mask, score_mod, scale) -> torch.Tensor:
    # Distinct masks, dtypes and layouts each compile once; the default
    # recompile limit (8) would silently fall back to eager flex.
    with torch._dynamo.config.patch(recompile_limit=256, accumulated_recompile_limit=4096):
        return _COMPILED_FLEX[query.device.type](
            query,
            key,
            value,
            score_mod=score_mod,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=query.shape[1] != key.shape[1],
        )


def dense_reason(
    query: torch.Tensor,
    key: torch.Tensor,
    dropout_p: float,
    config: Config,
    needs_grad: bool,
) -> str | None:
    """Why this call must run dense SDPA, or None when it can run sparse."""
    if not config.enabled:
        return "sparsity disabled"
    if query.dim() != 4 or key.dim() != 4:
        return f"query/key are {query.dim()}-D/{key.dim()}-D, sparse path takes 4-D (B, H, L, D)"
    if query.device.type not in ("cpu", "cuda"):
        return f"device {query.device.type} has no FlexAttention path"
    if query.dtype not in _SPARSE_DTYPES:
        return f"dtype {query.dtype} (sparse path takes fp16/bf16/fp32)"
    if dropout_p != 0.0:
        return "attention dropout"
    if needs_grad and query.device.type == "cpu":
        return "gradients on CPU (FlexAttention has no CPU backward)"
    if query.shape[2] < config.block_size:
        return f"query length {query.shape[2]} below one block ({config.block_size}), e.g. a decode step"
    if key.shape[2] < config.min_seq_len:
        return f"key length {key.shape[2]} below min_seq_len={config.min_seq_len}"
    return None


def _validate_inputs(query, key, value, attn_mask, is_causal, enable_gqa) -> None:
    B, Hq, Lq, D = query.shape
    if key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"key and value must be 4-D like query, but got key.dim()={key.dim()}, value.dim()={value.dim()}")
    if key.shape[0] != B or value.shape[0] != B:
        raise ValueError(f"query, key and value must share batch size, but got {B}, {key.shape[0]}, {value.shape[0]}")
    if key.shape[-1] != D:
        raise ValueError(f"query and key must share head dim, but got E={D} and E={key.shape[-1]}")
    if key.shape[1] != value.shape[1] or key.shape[2] != value.shape[2]:
        raise ValueError(f"key and value must share heads and length, but got key{tuple(key.shape)} and value{tuple(value.shape)}")
    Hkv = key.shape[1]
    if Hq != Hkv and not (enable_gqa and Hkv > 0 and Hq % Hkv == 0):
        raise ValueError(
            f"query heads must equal key heads, or be a multiple of them with enable_gqa=True, "
            f"but got Hq={Hq}, Hkv={Hkv}, enable_gqa={enable_gqa}"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query, key and value must share dtype, but got {query.dtype}, {key.dtype}, {value.dtype}")
    if attn_mask is not None:
        if is_causal:
            raise ValueError("attn_mask must be None when is_causal=True (as in scaled_dot_product_attention)")
        try:
            torch.broadcast_shapes(attn_mask.shape, (B, Hq, Lq, key.shape[2]))
        except RuntimeError:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B, Hq, Lq, Lk)={(B, Hq, Lq, key.shape[2])}"
            ) from None
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(f"attn_mask must be bool or floating point, but got {attn_mask.dtype}")


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_runs_on(t: torch.Tensor) -> bool:
    """The Triton kernels (scoring, selection) are the default on CUDA when
    Triton is installed (an optional dependency); otherwise torch ops run."""
    return t.is_cuda and _triton_installed()


def _block_scores(query, key, pattern: CallPattern, config: Config, scale: float | None) -> torch.Tensor:
    block_visible = None if pattern.causal_offset is not None else pattern.visibility.any
    if pattern.mask_mod is None and pattern.score_mod is None:
        block_visible = None  # everything is visible
    kwargs = dict(
        stride=config.stride,
        block_size=config.block_size,
        scale=scale,
        causal_offset=pattern.causal_offset,
        block_visible=block_visible,
    )
    use_triton = config.scorer == "triton" or (config.scorer == "auto" and _triton_runs_on(query))
    if use_triton:
        from .score_mods.antidiagonal_triton import antidiagonal_block_scores_triton

        return antidiagonal_block_scores_triton(query, key, **kwargs)
    return antidiagonal_block_scores(query, key, **kwargs)


def _build_block_mask(blocks: KVBlocks, pattern: CallPattern, block_size: int, seq_lengths, needs_q_blocks: bool):
    extra = {"compute_q_blocks": needs_q_blocks} if _FROM_KV_BLOCKS_TAKES_COMPUTE_Q else {}
    return BlockMask.from_kv_blocks(
        blocks.kv_num_blocks,
        blocks.kv_indices,
        blocks.full_kv_num_blocks,
        blocks.full_kv_indices,
        BLOCK_SIZE=block_size,
        mask_mod=pattern.mask_mod,
        seq_lengths=seq_lengths,
        **extra,
    )


def _forced_blocks(pattern: CallPattern, q_len: int, kv_len: int, config: Config, device: torch.device):
    return forced_blocks(
        q_len,
        kv_len,
        config.block_size,
        diagonal_offset=pattern.diagonal_offset,
        keep_sink=config.keep_sink and pattern.causal,
        keep_recent=config.keep_recent,
        device=device,
    )


def select_for_call(
    scores: torch.Tensor,
    pattern: CallPattern,
    q_len: int,
    kv_len: int,
    config: Config,
    call_name: str = "",
    *,
    use_triton: bool,
) -> KVBlocks:
    """The blocks a call keeps given its block scores: forced blocks (sink,
    diagonal, recent) plus the threshold cut, in FlexAttention's kv layout
    (``plan_blocks`` after scoring; the Triton kernel or the torch ops).

    Example:
        >>> pattern = call_pattern(q, k, None, True, config.block_size)
        >>> blocks = select_for_call(scores, pattern, q.shape[2], k.shape[2], config, use_triton=q.is_cuda)
    """
    # CPU Inductor (2.13) miscompiles captured-tensor mask_mods together with
    # full blocks: there every selected block carries the mask_mod.
    no_full_blocks = pattern.captures_tensors and scores.device.type == "cpu"
    return select_kv_blocks(
        scores,
        visible=pattern.visibility.any,
        fully_visible=None if no_full_blocks else pattern.visibility.all,
        forced=_forced_blocks(pattern, q_len, kv_len, config, scores.device),
        threshold=config.threshold_tensor(scores.shape[1], scores.device, call_name),
        use_triton=use_triton,
    )


def plan_blocks(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    config: Config,
    call_name: str = "",
) -> tuple[CallPattern, KVBlocks]:
    """The call's mask semantics and the block selection the sparse path
    computes (scorer -> forced blocks -> threshold selection), with
    ``.selected`` the ``(B, Hq, nQ, nK)`` bool selection. Inside
    ``xflex.calibration`` it also records the call's recall per candidate tau."""
    pattern = call_pattern(query, key, attn_mask, is_causal, config.block_size)
    scores = _block_scores(query, key, pattern, config, scale)
    blocks = select_for_call(
        scores, pattern, query.shape[2], key.shape[2], config, call_name, use_triton=_triton_runs_on(query)
    )
    for cal in active_calibrations():
        forced = _forced_blocks(pattern, query.shape[2], key.shape[2], config, query.device)
        recalls = _calibration_recalls(query, key, attn_mask, is_causal, scale, config.block_size, pattern, scores, forced, cal)
        cal.recalls.setdefault(call_name, []).append(recalls)
    return pattern, blocks


def _calibration_recalls(query, key, attn_mask, is_causal, scale, block_size, pattern, scores, forced, cal: Calibration):
    """``(len(cal.thresholds),)``: the true attention mass inside the blocks the
    selection keeps at each candidate threshold, on sampled query blocks."""
    q_blocks = sample_query_blocks(scores.shape[2], cal.samples)
    mass = sampled_block_mass(query, key, attn_mask, is_causal, scale, block_size, q_blocks)
    rows_that_see = mass.sum(-1) > 0
    sampled = dict(visible=pattern.visibility.any[:, :, q_blocks], forced=forced[:, :, q_blocks])
    return torch.stack(
        [
            (mass * select_blocks(scores[:, :, q_blocks], threshold=tau, **sampled)).sum(-1)[rows_that_see].mean()
            for tau in cal.thresholds
        ]
    )


def _sparse_attention(query, key, value, attn_mask, is_causal, scale, config: Config, needs_grad: bool, call_name: str):
    Lq, Lk = query.shape[2], key.shape[2]
    pattern, blocks = plan_blocks(query, key, attn_mask, is_causal, scale, config, call_name)
    block_mask = _build_block_mask(blocks, pattern, config.block_size, (Lq, Lk), needs_grad)
    out = _run_flex(
        query,
        key,
        value,
        block_mask=block_mask,
        score_mod=pattern.score_mod,
        scale=scale,
    )
    visible = pattern.visibility.any.expand_as(blocks.selected)
    return out, blocks.selected, visible, block_mask


def _selection_shape(query: torch.Tensor, key: torch.Tensor, block_size: int, needs_grad: bool):
    """Shape of the block selection the op returns for its backward:
    ``(B, Hq, nQ, nK)``, or all zeros when no backward will need it."""
    if not needs_grad or query.dim() != 4 or key.dim() != 4:
        return (0, 0, 0, 0)
    nq = (query.shape[2] + block_size - 1) // block_size
    nk = (key.shape[2] + block_size - 1) // block_size
    return (query.shape[0], query.shape[1], nq, nk)


@torch.library.custom_op("xflex::sparse_sdpa", mutates_args=())
def _sparse_sdpa_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    call_name: str,
    config: str,
    needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = effective_config(Config.from_key(config))
    reason = dense_reason(query, key, dropout_p, cfg, needs_grad)
    if reason is None:
        _validate_inputs(query, key, value, attn_mask, is_causal, enable_gqa)
    if reason is not None:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
        if recording():
            record_call(CallRecord(call_name, tuple(query.shape), tuple(key.shape), dense_reason=reason))
        # kv_num_blocks of -1 tells the backward that the forward ran dense.
        shape = _selection_shape(query, key, cfg.block_size, needs_grad)
        num = torch.full(shape[:3], -1, dtype=torch.int32, device=query.device)
        idx = torch.zeros(shape, dtype=torch.int32, device=query.device)
        return out.contiguous(), num, idx, num.clone(), idx.clone()

    with _eager_dispatch_state():
        out, selected, visible, block_mask = _sparse_attention(
            query, key, value, attn_mask, is_causal, scale, cfg, needs_grad, call_name
        )
    if recording():
        record_call(
            CallRecord(
                call_name,
                tuple(query.shape),
                tuple(key.shape),
                selected_blocks=selected.sum((0, 2, 3)),
                visible_blocks=visible.sum((0, 2, 3)),
            )
        )
    if not needs_grad:
        num = torch.zeros((0, 0, 0), dtype=torch.int32, device=query.device)
        idx = torch.zeros((0, 0, 0, 0), dtype=torch.int32, device=query.device)
        return out.contiguous(), num, idx, num.clone(), idx.clone()
    return (
        out.contiguous(),
        block_mask.kv_num_blocks.clone(),
        block_mask.kv_indices.clone(),
        block_mask.full_kv_num_blocks.clone(),
        block_mask.full_kv_indices.clone(),
    )


@_sparse_sdpa_op.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, call_name, config, needs_grad):
    shape = _selection_shape(query, key, Config.from_key(config).block_size, needs_grad)
    out = query.new_empty(query.shape[:-1] + (value.shape[-1],))
    num = query.new_empty(shape[:3], dtype=torch.int32)
    idx = query.new_empty(shape, dtype=torch.int32)
    return out, num, idx, num.new_empty(shape[:3]), idx.new_empty(shape)


@torch.library.custom_op("xflex::sparse_sdpa_backward", mutates_args=())
def _sparse_sdpa_backward_op(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor,
    full_kv_indices: torch.Tensor,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    config: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Recomputes the forward (dense SDPA or FlexAttention on the blocks the
    # forward selected) under autograd and differentiates it.
    ran_dense = kv_num_blocks.numel() == 0 or bool(kv_num_blocks.view(-1)[0] < 0)
    with _eager_dispatch_state(), torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (query, key, value))
        if ran_dense:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
            )
        else:
            block_size = Config.from_key(config).block_size
            pattern = call_pattern(q, k, attn_mask, is_causal, block_size)
            block_mask = BlockMask.from_kv_blocks(
                kv_num_blocks,
                kv_indices,
                full_kv_num_blocks,
                full_kv_indices,
                BLOCK_SIZE=block_size,
                mask_mod=pattern.mask_mod,
                seq_lengths=(q.shape[2], k.shape[2]),
            )
            out = _run_flex(q, k, v, block_mask=block_mask, score_mod=pattern.score_mod, scale=scale)
        return tuple(g.contiguous() for g in torch.autograd.grad(out, (q, k, v), grad_out))


@_sparse_sdpa_backward_op.register_fake
def _(grad_out, query, key, value, *args):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, attn_mask, _dropout_p, is_causal, scale, enable_gqa, _name, config, _needs_grad = inputs
    _out, *selection = output
    ctx.save_for_backward(query, key, value, attn_mask, *selection)
    ctx.call_args = (is_causal, scale, enable_gqa, config)


def _backward(ctx, grad_out, *_selection_grads):
    query, key, value, attn_mask, *selection = ctx.saved_tensors
    grads = torch.ops.xflex.sparse_sdpa_backward(grad_out, query, key, value, attn_mask, *selection, *ctx.call_args)
    return (*grads, None, None, None, None, None, None, None, None)


_sparse_sdpa_op.register_autograd(_backward, setup_context=_setup_context)


def sparse_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    config: Config | None = None,
    name: str = "sparse_sdpa",
) -> torch.Tensor:
    """Drop-in for ``F.scaled_dot_product_attention`` that runs XAttention
    block-sparse attention (what the ``xattn`` backend rewrites SDPA into).

    Args:
        query: ``(B, Hq, Lq, E)``; key ``(B, Hkv, Lk, E)``; value ``(B, Hkv, Lk, Ev)``.
        attn_mask, dropout_p, is_causal, scale, enable_gqa: as in SDPA.
        config: defaults (``xflex.Config``); ``xflex.sparsity()`` overrides them.
        name: the call's name in ``SparsityStats`` records.

    Returns:
        ``(B, Hq, Lq, Ev)``: attention restricted to the selected blocks, or
        SDPA's own result when the call falls back to dense.

    Example:
        >>> q = k = v = torch.randn(1, 4, 2048, 64)
        >>> out = xflex.sparse_sdpa(q, k, v, is_causal=True)   # doctest: +SKIP
    """
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        raise TypeError("query, key and value must be tensors")
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        raise TypeError(f"is_causal and enable_gqa must be bool, but got {is_causal!r} and {enable_gqa!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1], but got {dropout_p!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be None or a finite float, but got {scale!r}")
    config = config if config is not None else Config()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    out, *_ = torch.ops.xflex.sparse_sdpa(
        query,
        key,
        value,
        attn_mask,
        float(dropout_p),
        is_causal,
        None if scale is None else float(scale),
        enable_gqa,
        name,
        config.to_key(),
        needs_grad,
    )
    return out
