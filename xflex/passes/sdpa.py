"""Find `scaled_dot_product_attention` calls in an FX graph (every form dynamo
emits) and rewrite them into a given replacement, with SDPA's arguments
normalised and Hugging Face's `repeat_kv` copies of K/V undone."""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..torch_internals import SDPA_C_FUNCTION
from .repeat_kv import unrepeat_kv

__all__ = ["SDPA_TARGETS", "SdpaCall", "find_sdpa_calls", "rewrite_sdpa"]

SDPA_TARGETS = frozenset(
    {
        F.scaled_dot_product_attention,
        SDPA_C_FUNCTION,
        torch.ops.aten.scaled_dot_product_attention.default,
        torch.ops.aten.scaled_dot_product_attention,
    }
)


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA's Python signature, used to bind positional and keyword forms."""


_SIGNATURE = inspect.signature(_sdpa_signature)


@dataclasses.dataclass
class SdpaCall:
    """One SDPA call site with its arguments bound by name.

    Tensor arguments are graph nodes; the rest are constants or nodes.
    ``key``/``value`` are the un-repeated originals when ``repeat_kv`` was found
    (``enable_gqa`` is then True and ``unrepeated`` records the factor).
    """

    node: fx.Node
    name: str
    query: fx.Node
    key: fx.Node
    value: fx.Node
    attn_mask: object = None
    dropout_p: object = 0.0
    is_causal: object = False
    scale: object = None
    enable_gqa: object = False
    unrepeated: int = 1

    def example(self, argument: str) -> torch.Tensor | None:
        """The fake tensor dynamo recorded for a tensor argument, if any."""
        node = getattr(self, argument)
        if not isinstance(node, fx.Node):
            return None
        value = node.meta.get("example_value", node.meta.get("val"))
        return value if isinstance(value, torch.Tensor) else None


def _call_site_name(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = str(list(stack.values())[-1][0])
        # "L['self'].model.layers[3].self_attn" -> "model.layers.3.self_attn"
        # (or "L['args'][0].model..." when forward is wrapped, as in transformers)
        path = re.sub(r"^L\['[^']*'\](?:\[\d+\])?\.?", "", path)
        # Modules whose __getattr__ is custom (diffusers) are recorded through
        # their __dict__: "L['self'].__dict__['_modules']['blocks'].0.attn1".
        path = re.sub(r"\.?__dict__\['_modules'\]", "", path)
        return re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path).lstrip(".") or node.name
    return node.name


def find_sdpa_calls(graph: fx.Graph) -> list[SdpaCall]:
    """Every SDPA call in ``graph``, in graph order, with normalised arguments."""
    calls: list[SdpaCall] = []
    names: dict[str, int] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        bound = _SIGNATURE.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        name = _call_site_name(node)
        seen = names.get(name, 0)
        names[name] = seen + 1
        call = SdpaCall(node=node, name=name if seen == 0 else f"{name}#{seen}", **bound.arguments)
        calls.append(unrepeat_kv(call))
    return calls


def rewrite_sdpa(
    gm: fx.GraphModule,
    replacement: Callable[[fx.Graph, SdpaCall], fx.Node | None],
) -> list[tuple[SdpaCall, bool]]:
    """Replace SDPA calls in ``gm`` in place.

    ``replacement(graph, call)`` is called with the graph's insertion point
    just before the call; it returns the node whose value replaces the call's
    output, or None to leave that call as it is.

    Returns:
        ``(call, rewritten)`` for every SDPA call found.

    Example:
        >>> gm = torch.fx.symbolic_trace(model)            # doctest: +SKIP
        >>> rewrite_sdpa(gm, lambda g, c: g.call_function(my_attention, (c.query, c.key, c.value)))  # doctest: +SKIP
    """
    report = []
    for call in find_sdpa_calls(gm.graph):
        with gm.graph.inserting_before(call.node):
            new = replacement(gm.graph, call)
        if new is not None:
            new.meta.update({k: v for k, v in call.node.meta.items() if k in ("stack_trace", "nn_module_stack")})
            call.node.replace_all_uses_with(new)
            gm.graph.erase_node(call.node)
        report.append((call, new is not None))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return report
