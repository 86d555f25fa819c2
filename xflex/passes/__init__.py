"""torch.fx passes: find SDPA calls and rewrite them into a given op. Plain
FX: imports nothing of xflex but ``xflex.torch_internals``, and is told which
op to rewrite to (``rewrite_sdpa``'s ``replacement``)."""

from .repeat_kv import repeated_source, unrepeat_kv
from .sdpa import SDPA_TARGETS, SdpaCall, find_sdpa_calls, rewrite_sdpa

__all__ = ["SDPA_TARGETS", "SdpaCall", "find_sdpa_calls", "repeated_source", "rewrite_sdpa", "unrepeat_kv"]
