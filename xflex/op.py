"""The run-time xflex op: what every rewritten SDPA call becomes.

It reads the active settings when it runs, decides dense fallbacks from the
actual inputs (``policy``), and otherwise runs ``planning.plan`` (scorer ->
selection -> BlockMask) and FlexAttention, reporting to ``xflex.sparsity()``
stats and ``xflex.calibration()``. It is an opaque custom op so that Inductor
keeps it whole and so that run-time settings never reach a graph guard.
"""

from __future__ import annotations

import torch

from .torch_internals import eager_dispatch_state, sdpa_patched_by_context_parallel
from .attention import SdpaArgs, build_block_mask, call_pattern, flex_attention_backward
from .calibration import active_calibrations
from .config import Config
from .context import effective_config, record_call, recording
from .planning import plan
from .policy import ANONYMOUS_CALL, DensityCheck, dense_reason
from .stats import CallRecord

__all__ = ["sparse_sdpa"]


def _selection_shape(query: torch.Tensor, key: torch.Tensor, block_size: int, needs_grad: bool):
    """Shape of the block selection the op returns for its backward:
    ``(B, Hq, nQ, nK)``, or all zeros when no backward will need it."""
    if not needs_grad or query.dim() != 4 or key.dim() != 4:
        return (0, 0, 0, 0)
    nq = (query.shape[2] + block_size - 1) // block_size
    nk = (key.shape[2] + block_size - 1) // block_size
    return (query.shape[0], query.shape[1], nq, nk)


def _lse_shape(query: torch.Tensor, needs_grad: bool) -> tuple[int, ...]:
    """Shape of the log-sum-exp the op returns for its backward: ``(B, Hq, Lq)``
    where a backward may need it, else empty."""
    return tuple(query.shape[:-1]) if needs_grad and query.dim() == 4 else (0, 0, 0)


def _dense_marker(shape: tuple[int, ...], lse_shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """A log-sum-exp (unused) and a kv layout whose ``kv_num_blocks`` of -1
    tells the backward that the forward ran dense."""
    num = torch.full(shape[:3], -1, dtype=torch.int32, device=device)
    idx = torch.zeros(shape, dtype=torch.int32, device=device)
    lse = torch.zeros(lse_shape, dtype=torch.float32, device=device)
    return lse, num, idx, num.clone(), idx.clone()


# Ring attention exchanges keys between ranks inside SDPA; the xflex op would
# select and attend within this rank's shard only: a wrong answer, not an error.
_CONTEXT_PARALLEL_ERROR = (
    "the xflex op cannot run inside torch.distributed.tensor.experimental.context_parallel(): that context "
    "shards q/k/v along the sequence and only its own SDPA exchanges keys between ranks, so xflex would attend "
    "within this rank's shard. Use xflex.distributed.ulysses_attention on the shards instead (README: Several GPUs)"
)


# The op decides on the host per call (settings, fallbacks, the density check),
# so CUDA graphs must not capture it: the tag makes Inductor's graph partition
# run it between captured graphs under mode="reduce-overhead" (backend.py).
_NOT_CAPTURABLE = (torch.Tag.cudagraph_unsafe,)

_CAPTURE_ERROR = (
    "the xflex op cannot run inside CUDA graph capture: it reads the active xflex.sparsity() settings and "
    "decides dense fallbacks on the host each call, which a replayed graph would freeze. Use "
    'torch.compile(model, backend="xattn", mode="reduce-overhead"): it captures everything around the op'
)


@torch.library.custom_op("xflex::sparse_sdpa", mutates_args=(), tags=_NOT_CAPTURABLE)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if sdpa_patched_by_context_parallel():
        raise RuntimeError(_CONTEXT_PARALLEL_ERROR)
    if query.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(_CAPTURE_ERROR)
    args = SdpaArgs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    cfg = effective_config(Config.from_key(config))
    reason = dense_reason(args, cfg, needs_grad)
    if reason is None:
        args.validate()
        with eager_dispatch_state():
            pattern = call_pattern(query, key, attn_mask, is_causal, cfg.block_size)
            density_check = DensityCheck(args, cfg, needs_grad, call_name)
            reason = density_check.before_scoring(pattern)
            if reason is None:
                call_plan = plan(
                    query,
                    key,
                    attn_mask,
                    is_causal,
                    scale,
                    config=cfg,
                    call_name=call_name,
                    for_backward=needs_grad,
                    value_head_dim=value.shape[-1],
                    pattern=pattern,
                )
                reason = density_check.after_scoring(call_plan)
    if reason is not None:
        out = args.dense()
        if recording():
            record_call(CallRecord(call_name, tuple(query.shape), tuple(key.shape), dense_reason=reason))
        shape = _selection_shape(query, key, cfg.block_size, needs_grad)
        return (out.contiguous(), *_dense_marker(shape, _lse_shape(query, needs_grad), query.device))

    # no_grad: eager_dispatch_state re-enables autograd, and the op's own
    # backward (below) differentiates from the saved out and lse.
    with eager_dispatch_state(), torch.no_grad():
        if needs_grad:
            out, lse = call_plan.attend(query, key, value, return_lse=True)
        else:
            out = call_plan.attend(query, key, value)
        for cal in active_calibrations():
            cal.measure(call_name, args, call_plan, cfg)
    if recording():
        record_call(
            CallRecord(
                call_name,
                tuple(query.shape),
                tuple(key.shape),
                selected_blocks=call_plan.selected.sum((0, 2, 3)),
                visible_blocks=call_plan.visible.sum((0, 2, 3)),
            )
        )
    if not needs_grad:
        lse = torch.zeros((0, 0, 0), dtype=torch.float32, device=query.device)
        num = torch.zeros((0, 0, 0), dtype=torch.int32, device=query.device)
        idx = torch.zeros((0, 0, 0, 0), dtype=torch.int32, device=query.device)
        return out.contiguous(), lse, num, idx, num.clone(), idx.clone()
    return (out.contiguous(), lse.contiguous(), *(t.clone() for t in call_plan.blocks.kv_layout))


@_sparse_sdpa_op.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, call_name, config, needs_grad):
    shape = _selection_shape(query, key, Config.from_key(config).block_size, needs_grad)
    out = query.new_empty(query.shape[:-1] + (value.shape[-1],))
    lse = query.new_empty(_lse_shape(query, needs_grad), dtype=torch.float32)
    num = query.new_empty(shape[:3], dtype=torch.int32)
    idx = query.new_empty(shape, dtype=torch.int32)
    return out, lse, num, idx, num.new_empty(shape[:3]), idx.new_empty(shape)


@torch.library.custom_op("xflex::sparse_sdpa_backward", mutates_args=(), tags=_NOT_CAPTURABLE)
def _sparse_sdpa_backward_op(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
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
    if kv_num_blocks.numel() == 0 or bool(kv_num_blocks.view(-1)[0] < 0):
        # The forward ran dense SDPA, whose saved state no op output carries:
        # recompute it under autograd and differentiate it.
        with eager_dispatch_state(), torch.enable_grad():
            q, k, v = (t.detach().requires_grad_() for t in (query, key, value))
            dense = SdpaArgs(q, k, v, attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa).dense()
            return tuple(g.contiguous() for g in torch.autograd.grad(dense, (q, k, v), grad_out))
    # The sparse forward's own backward: FlexAttention's, from its out and lse.
    block_size = Config.from_key(config).block_size
    pattern = call_pattern(query, key, attn_mask, is_causal, block_size)
    block_mask = build_block_mask(
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        mask_mod=pattern.mask_mod,
        block_size=block_size,
        seq_lengths=(query.shape[2], key.shape[2]),
        for_backward=True,
    )
    grads = flex_attention_backward(
        query, key, value, out, lse, grad_out, block_mask=block_mask, mask=pattern.mask, score=pattern.score, scale=scale
    )
    return tuple(g.contiguous() for g in grads)


@_sparse_sdpa_backward_op.register_fake
def _(grad_out, query, key, value, *args):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, attn_mask, _dropout_p, is_causal, scale, enable_gqa, _name, config, _needs_grad = inputs
    out, lse, *selection = output
    ctx.save_for_backward(query, key, value, out, lse, attn_mask, *selection)
    ctx.call_args = (is_causal, scale, enable_gqa, config)


def _backward(ctx, grad_out, *_selection_grads):
    query, key, value, out, lse, attn_mask, *selection = ctx.saved_tensors
    grads = torch.ops.xflex.sparse_sdpa_backward(
        grad_out, query, key, value, out, lse, attn_mask, *selection, *ctx.call_args
    )
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
    name: str = ANONYMOUS_CALL,
) -> torch.Tensor:
    """Drop-in for ``F.scaled_dot_product_attention`` that runs XAttention
    block-sparse attention (what the ``xattn`` backend rewrites SDPA into).

    Args:
        query: ``(B, Hq, Lq, E)``; key ``(B, Hkv, Lk, E)``; value ``(B, Hkv, Lk, Ev)``.
        attn_mask, dropout_p, is_causal, scale, enable_gqa: as in SDPA.
        config: defaults (``xflex.Config``); ``xflex.sparsity()`` overrides them.
        name: the call's name in ``SparsityStats`` records, and its call site
            in the break-even's density history (``xflex.policy.DensityHistory``):
            give each place that calls attention its own name. Unnamed calls
            keep no history (each is forecast and checked on its own).

    Returns:
        ``(B, Hq, Lq, Ev)``: attention restricted to the selected blocks, or
        SDPA's own result when the call falls back to dense.

    Example:
        >>> q = k = v = torch.randn(1, 4, 2048, 64)
        >>> out = xflex.sparse_sdpa(q, k, v, is_causal=True)   # doctest: +SKIP
    """
    SdpaArgs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa).validate_values()
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
