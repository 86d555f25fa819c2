"""The `xattn` torch.compile backend: rewrite every SDPA call into the xflex
op, then hand the graph to Inductor."""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.fx as fx

from .torch_internals import compile_fx, inductor_mode_options, inductor_option_names
from .config import Config
from .passes import SdpaCall, rewrite_sdpa

__all__ = ["CompiledCall", "last_compile_report", "split_options", "xattn"]

log = logging.getLogger("xflex")

_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class CompiledCall:
    """One SDPA call an ``xattn`` compilation saw.

    Attributes:
        name: the call site (module path, as ``SparsityStats`` names it).
        rewritten: routed through the xflex op (which decides dense or sparse
            per call at run time); False: left as plain SDPA.
        reason: why it was left as plain SDPA (None when rewritten).
        gqa_unrepeated: the GQA factor of a ``repeat_kv`` undone (1: none).
    """

    name: str
    rewritten: bool
    reason: str | None
    gqa_unrepeated: int


_last_report: list[CompiledCall] = []


def split_options(options: Mapping[str, object] | None) -> tuple[dict[str, object], dict[str, object]]:
    """Split ``torch.compile(options=...)`` into xflex options and Inductor config
    options; a name that is neither raises, naming the valid ones."""
    if options is None:
        return {}, {}
    if not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict, but got {type(options).__name__}")
    ours, inductor = {}, {}
    inductor_names = inductor_option_names()
    for name, value in options.items():
        if name in Config.__dataclass_fields__:
            ours[name] = value
        elif name in inductor_names:
            inductor[name] = value
        else:
            raise ValueError(
                f"unknown option {name!r} for backend 'xattn'; xflex options are "
                f"{sorted(Config.__dataclass_fields__)}, anything else must be an Inductor config name"
            )
    return ours, inductor


def _static_dropout(call: SdpaCall) -> float | None:
    return float(call.dropout_p) if isinstance(call.dropout_p, (int, float)) else None


def _needs_grad(call: SdpaCall) -> bool:
    if not torch.is_grad_enabled():
        return False
    examples = [call.example(name) for name in ("query", "key", "value")]
    # Without recorded fake values we cannot tell: assume gradients may flow.
    return any(e is None or e.requires_grad for e in examples)


def _device_type(call: SdpaCall) -> str | None:
    example = call.example("query")
    return None if example is None else example.device.type


def _keep_dense_reason(call: SdpaCall) -> str | None:
    """Calls left as plain SDPA in the graph (decided at compile time because
    dynamo already specialises on what they depend on)."""
    dropout = _static_dropout(call)
    if dropout is None or dropout != 0.0:
        # SDPA's dropout mask cannot be replayed in a separate backward op.
        return "attention dropout (training)"
    if isinstance(call.attn_mask, torch.Tensor) or type(call.attn_mask).__name__ == "CausalBias":
        return "attn_mask is a constant or tensor subclass"
    return None


def _sparse_op_node(config_key: str, report: list[CompiledCall]) -> Callable[[fx.Graph, SdpaCall], fx.Node | None]:
    def replace(graph: fx.Graph, call: SdpaCall) -> fx.Node | None:
        reason = _keep_dense_reason(call)
        report.append(CompiledCall(call.name, reason is None, reason, call.unrepeated))
        if reason is not None:
            log.info("xflex: leaving %s dense: %s", call.name, reason)
            return None
        op = graph.call_function(
            torch.ops.xflex.sparse_sdpa.default,
            (
                call.query,
                call.key,
                call.value,
                call.attn_mask,
                0.0,
                call.is_causal,
                call.scale,
                call.enable_gqa,
                call.name,
                config_key,
                _needs_grad(call),
            ),
        )
        return graph.call_function(operator.getitem, (op, 0))

    return replace


def last_compile_report() -> list[CompiledCall]:
    """One entry per SDPA call seen by the most recent ``xattn`` compilation:
    its name, whether it was rewritten, why not, and the GQA factor undone.

    Example:
        >>> model = torch.compile(model, backend="xattn"); model(x)   # doctest: +SKIP
        >>> [c.name for c in xflex.last_compile_report() if c.rewritten]   # doctest: +SKIP
        ['layers.0.attn', 'layers.1.attn']
    """
    return list(_last_report)


def xattn(
    gm: fx.GraphModule,
    example_inputs: Sequence[object],
    *,
    options: Mapping[str, object] | None = None,
    mode: str | None = None,
) -> Callable[..., object]:
    """torch.compile backend: XAttention block-sparse attention for every SDPA call.

    Args:
        gm: the dynamo FX graph.
        example_inputs: its example inputs.
        options: xflex options (see ``xflex.Config``: ``enabled``, ``threshold``,
            ``stride``, ``block_size``, ``min_seq_len``, ``keep_sink``,
            ``keep_recent``, ``backend``) and/or Inductor config names.
        mode: an Inductor mode ("max-autotune", ...), passed on. Under
            "reduce-overhead" CUDA graphs capture everything but the xflex
            op, which runs between them and so still follows ``sparsity()``.

    Returns:
        The Inductor-compiled callable.

    Example:
        >>> model = torch.compile(model, backend="xattn", options={"threshold": 0.9, "stride": 8})  # doctest: +SKIP
    """
    if mode is not None and mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, but got {mode!r}")
    ours, inductor_options = split_options(options)
    config = Config.from_options(ours)
    report: list[dict[str, object]] = []
    rewrite_sdpa(gm, _sparse_op_node(config.to_key(), report))
    _last_report[:] = report
    patches = {**(inductor_mode_options(mode) if mode else {}), **inductor_options}
    if patches.get("triton.cudagraphs"):
        # The xflex op is tagged cudagraph_unsafe (op.py): partitioning captures
        # the graph around it instead of skipping CUDA graphs for the whole graph.
        patches.setdefault("graph_partition", True)
    return compile_fx(gm, example_inputs, config_patches=patches)
