"""Recognise Hugging Face's `repeat_kv` (index with None -> expand -> reshape)
in front of SDPA and use GQA natively instead of attending over the copies."""

from __future__ import annotations

import dataclasses
import operator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

if TYPE_CHECKING:
    from .sdpa import SdpaCall

__all__ = ["repeated_source", "unrepeat_kv"]

_RESHAPES = ("reshape", "view")


def _shape(node: fx.Node) -> tuple | None:
    value = node.meta.get("example_value", node.meta.get("val"))
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _is_method(node: object, names: tuple[str, ...]) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_method" and node.target in names)
        or (node.op == "call_function" and getattr(node.target, "__name__", None) in names)
    )


def _inserts_axis_2(node: object) -> fx.Node | None:
    """``x[:, :, None]`` or ``x.unsqueeze(2)``: returns x."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    if node.op == "call_function" and node.target is operator.getitem:
        source, index = node.args
        if isinstance(index, tuple) and len(index) >= 3 and index[2] is None:
            if all(isinstance(i, slice) and i == slice(None) for i in index[:2] + index[3:]):
                return source
    if _is_method(node, ("unsqueeze",)) and node.args[1:] in ((2,), (-3,)) and not node.kwargs:
        return node.args[0]
    return None


def repeated_source(node: object) -> tuple[fx.Node, int] | None:
    """If ``node`` is ``repeat_kv(x, n)``, return ``(x, n)``."""
    if not _is_method(node, _RESHAPES):
        return None
    expanded = node.args[0]
    if not _is_method(expanded, ("expand",)):
        return None
    source = _inserts_axis_2(expanded.args[0])
    if source is None:
        return None
    before, after = _shape(source), _shape(node)
    if before is None or after is None or len(before) != 4 or len(after) != 4:
        return None
    if before[0] != after[0] or before[2:] != after[2:] or before[1] == 0:
        return None
    heads_ratio = after[1] // before[1]
    if before[1] * heads_ratio != after[1]:
        return None
    return source, heads_ratio


def unrepeat_kv(call: SdpaCall) -> SdpaCall:
    """``call`` with key/value taken from before a matching ``repeat_kv`` pair."""
    key, value = repeated_source(call.key), repeated_source(call.value)
    if key is None or value is None or key[1] != value[1] or key[1] == 1:
        return call
    if call.enable_gqa not in (False, True):
        return call
    return dataclasses.replace(call, key=key[0], value=value[0], enable_gqa=True, unrepeated=key[1])
