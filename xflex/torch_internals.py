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
from collections.abc import Callable, Iterator, Sequence

import torch

__all__ = [
    "SDPA_C_FUNCTION",
    "compile_fx",
    "compile_seconds",
    "eager_dispatch_state",
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
