"""Every private PyTorch API xflex relies on, in one place.

Each has no public equivalent in torch 2.11-2.13 (the versions tried: 2.11 on
CUDA, 2.13 on the CPU); ``tests/test_torch_internals.py`` checks each one, so a
torch release that removes or renames one fails there with the name, not
somewhere deep in a compiled model. Public replacements already taken:
``torch.compiler.disable`` (was ``torch._dynamo.disable``).

Imports only torch: the pass, the attention stages and the face all use it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch

__all__ = [
    "SDPA_C_FUNCTION",
    "compile_fx",
    "compile_seconds",
    "eager_dispatch_state",
    "flex_attention_backward_graph",
    "flex_attention_backward_inputs",
    "inductor_mode_options",
    "inductor_option_names",
    "mark_dynamic_if_possible",
    "recompile_limits",
    "sdpa_patched_by_context_parallel",
]

# How dynamo records `F.scaled_dot_product_attention` in FX graphs.
SDPA_C_FUNCTION = torch._C._nn.scaled_dot_product_attention

# A custom op's kernel runs with every dispatch key above the backend excluded;
# compiling flex_attention (functionalization, vmap) inside it needs the
# ordinary eager state back. Captured at import, outside any op.
_EAGER_DISPATCH_STATE = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())


@contextlib.contextmanager
def eager_dispatch_state() -> Iterator[None]:
    """Run the block with the dispatch keys of ordinary eager code."""
    with torch._C._ForceDispatchKeyGuard(*_EAGER_DISPATCH_STATE):
        yield


@contextlib.contextmanager
def recompile_limits(per_code: int, accumulated: int) -> Iterator[None]:
    """Raise dynamo's recompile limits inside the block: the compiled
    FlexAttention call sees one graph per mask kind, dtype and layout, and past
    the default limit (8) dynamo silently runs flex eagerly."""
    with torch._dynamo.config.patch(recompile_limit=per_code, accumulated_recompile_limit=accumulated):
        yield


def inductor_option_names() -> set[str]:
    """Inductor's config names (``torch.compile(options=...)`` takes them), dotted
    like ``"triton.cudagraphs"``; ``torch.compile``'s docstring points here."""
    return set(torch._inductor.list_options())


def inductor_mode_options(mode: str) -> dict[str, object]:
    """The Inductor config a ``torch.compile`` mode stands for."""
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


def compile_fx(gm: torch.fx.GraphModule, example_inputs: Sequence[object], config_patches: dict[str, object]) -> Callable:
    """Inductor on an FX graph: what every backend that ends in Inductor calls."""
    from torch._inductor.compile_fx import compile_fx as inductor_compile_fx

    return inductor_compile_fx(gm, example_inputs, config_patches=config_patches)


def mark_dynamic_if_possible(tensor: torch.Tensor, dim: int) -> None:
    """Ask dynamo to compile ``dim`` of ``tensor`` as a dynamic size when it
    can (no error if it specialises it)."""
    torch._dynamo.maybe_mark_dynamic(tensor, dim)


def compile_seconds() -> float:
    """Seconds dynamo and its backends have spent compiling in this process."""
    return float(torch._dynamo.utils.calculate_time_spent().get("total_wall_time", 0.0))


def sdpa_patched_by_context_parallel() -> bool:
    """Whether ``torch.distributed.tensor.experimental.context_parallel()`` is
    active. That context replaces ``F.scaled_dot_product_attention`` with a
    wrapper defined in its own (private) module, which turns the local q/k/v
    shards into sequence-sharded DTensors for ring attention; any other
    attention op inside sees only this rank's shard."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    module = getattr(sdpa, "__module__", None) or ""
    return sdpa is not SDPA_C_FUNCTION and module.startswith("torch.distributed.tensor.experimental")


def flex_attention_backward_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    block_mask: "torch.nn.attention.flex_attention.BlockMask",
    mask_buffers: tuple[torch.Tensor, ...],
    score_buffers: tuple[torch.Tensor, ...],
) -> list[torch.Tensor]:
    """The inputs of :func:`flex_attention_backward_graph`'s graph for one
    call, in its order; ``lse`` natural-log as FlexAttention returns it."""
    layout = [entry for entry in block_mask.as_tuple()[:-1] if isinstance(entry, torch.Tensor)]
    # The HOP takes base-2 stats (FlexAttention's kernels use exp2). Converted
    # here, outside the graph: fused into the backward template's lse loads,
    # torch 2.11 got dq wrong for every batch after the first (H200).
    lse2 = lse / math.log(2.0)
    return [query, key, value, out, lse2, grad_out, *layout, *mask_buffers, *score_buffers]


def flex_attention_backward_graph(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    block_mask: "torch.nn.attention.flex_attention.BlockMask",
    mask_fn: Callable[..., torch.Tensor],
    mask_buffers: tuple[torch.Tensor, ...],
    score_fn: Callable[..., torch.Tensor] | None,
    score_buffers: tuple[torch.Tensor, ...],
    scale: float,
) -> torch.fx.GraphModule:
    """FlexAttention's backward (the ``flex_attention_backward`` HOP, which
    torch's own autograd runs after a compiled ``flex_attention``) traced into
    an FX graph from the forward's ``out`` and ``lse``: no public API runs it
    without running the forward again.

    The graph takes :func:`flex_attention_backward_inputs` and returns
    ``(dq, dk, dv)``; the lengths, block sizes and ``scale`` are baked in, so
    Inductor compiles it once per shape. ``lse`` is the natural-log
    log-sum-exp that ``flex_attention(..., return_aux=AuxRequest(lse=True))``
    returns. ``mask_fn(b, h, q_idx, kv_idx, *mask_buffers)`` replaces the
    BlockMask's mask_mod and ``score_fn(score, b, h, q_idx, kv_idx,
    *score_buffers)`` (None: identity) is the score_mod; both read tensors
    only through their buffers, which stay graph inputs."""
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex
    from torch._higher_order_ops.flex_attention import create_fw_bw_graph, flex_attention_backward
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.nn.attention.flex_attention import _apply_kernel_options, _identity

    layout = block_mask.as_tuple()[:-1]  # its last entry is the mask_mod: mask_fn replaces it
    slots = [i for i, entry in enumerate(layout) if isinstance(entry, torch.Tensor)]
    kernel_options = _apply_kernel_options(query, key, value, True, None)
    # The score_mod's forward and joint graphs, made the way flex_attention's
    # autograd makes them: with grad enabled, as in a forward (a backward runs
    # without; the joint graph of `score + bias` then has no score gradient).
    index = [query.new_zeros((), dtype=torch.int) for _ in range(4)]
    with TransformGetItemToIndex(), torch.enable_grad():
        fw_graph, joint_graph = create_fw_bw_graph(
            score_fn or _identity, (query.new_zeros((), requires_grad=True), *index), score_buffers
        )
    n_layout, n_mask = len(slots), len(mask_buffers)

    def backward(q, k, v, o, lse2, d_out, *tensors):
        entries = list(layout)
        for slot, tensor in zip(slots, tensors[:n_layout]):
            entries[slot] = tensor
        mask_args = tuple(tensors[n_layout : n_layout + n_mask])
        score_args = tuple(tensors[n_layout + n_mask :])
        dq, dk, dv, _ = flex_attention_backward(
            q, k, v, o, lse2, d_out, None, fw_graph, joint_graph, (*entries, mask_fn),
            scale, kernel_options, score_args, mask_args,
        )
        return dq, dk, dv

    inputs = flex_attention_backward_inputs(
        query, key, value, out, lse, grad_out, block_mask=block_mask, mask_buffers=mask_buffers, score_buffers=score_buffers
    )
    with TransformGetItemToIndex():
        return make_fx(backward, tracing_mode="fake")(*inputs)
