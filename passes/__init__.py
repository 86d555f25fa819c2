"""torch.fx passes: find SDPA calls and rewrite them into a given op. A leaf
package: plain FX, imports neither ``xflex`` nor ``xflex.score_mods``."""

from .repeat_kv import repeated_source, unrepeat_kv
from .sdpa import SDPA_TARGETS, SdpaCall, find_sdpa_calls, rewrite_sdpa

__all__ = ["SDPA_TARGETS", "SdpaCall", "find_sdpa_calls", "repeated_source", "rewrite_sdpa", "unrepeat_kv"]
