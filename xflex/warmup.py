"""Dense warmup for denoising loops (the video recipe of XAttention and Sparse
VideoGen): the first sampler steps run dense attention, the later ones sparse."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import torch.nn as nn

from .context import sparsity

__all__ = ["DenseWarmup", "dense_warmup"]


@dataclasses.dataclass
class DenseWarmup:
    """Calls counted by one :func:`dense_warmup` block.

    Attributes:
        steps: denoising steps run dense.
        calls_per_step: module calls per denoising step.
        dense_calls: calls run with ``xflex.sparsity(enabled=False)``.
        sparse_calls: calls run after the warmup, with the surrounding settings
            (a call can still fall back to dense for its own reason, e.g. a
            short key; ``SparsityStats.dense_calls`` lists those).
    """

    steps: int
    calls_per_step: int
    dense_calls: int = 0
    sparse_calls: int = 0

    @property
    def warmup_calls(self) -> int:
        """Calls forced dense: ``steps * calls_per_step``."""
        return self.steps * self.calls_per_step

    @property
    def calls(self) -> int:
        """Calls started so far."""
        return self.dense_calls + self.sparse_calls

    @property
    def step(self) -> int:
        """Denoising step the next call belongs to (0-based)."""
        return self.calls // self.calls_per_step

    @property
    def warming_up(self) -> bool:
        """Whether the next call runs dense."""
        return self.calls < self.warmup_calls


def _validate_warmup(module: object, steps: object, calls_per_step: object) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"dense_warmup() argument 'module' must be a torch.nn.Module (e.g. pipe.transformer), "
            f"but got {type(module).__name__}"
        )
    for name, value, low in (("steps", steps, 0), ("calls_per_step", calls_per_step, 1)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"dense_warmup() argument {name!r} must be an int >= {low}, but got {value!r}")
        if value < low:
            raise ValueError(f"dense_warmup() argument {name!r} must be an int >= {low}, but got {value!r}")


@contextlib.contextmanager
def dense_warmup(module: nn.Module, steps: int, calls_per_step: int = 1) -> Iterator[DenseWarmup]:
    """Run the first ``steps * calls_per_step`` calls of ``module`` dense, the
    rest with the surrounding ``xflex.sparsity()`` settings, without recompiling.

    Diffusers pipelines call ``pipe.transformer(...)`` once per denoising step
    (classifier-free guidance batched into one call), or twice per step when
    the conditional and unconditional passes are separate calls: pass
    ``calls_per_step=2`` then. The block installs a forward pre-hook and a
    forward hook on ``module`` that enter and leave ``xflex.sparsity(enabled=False)``
    around each warmup call; the hooks are removed on exit. Counting starts
    at zero in every block: wrap each ``pipe(...)`` call (each video) in its own.

    ``module`` may be the compiled ``OptimizedModule`` (what
    ``torch.compile(pipe.transformer, ...)`` returns) or the module it wraps:
    in both cases the hooks run in Python outside the compiled graph, so they
    add no guards and trigger no recompilation (checked on torch 2.13, also
    for in-place ``module.compile(backend="xattn")``, where dynamo starts
    tracing at ``forward``). The hooks are marked ``torch.compiler.disable`` so
    that a torch version tracing ``Module.__call__`` runs them eagerly instead
    of baking a setting into the graph.

    Args:
        module: the module the sampler calls once per step or per guidance
            branch (``pipe.transformer``).
        steps: denoising steps to run dense, an int >= 0 (0: no warmup).
        calls_per_step: module calls per denoising step, an int >= 1.

    Yields:
        :class:`DenseWarmup`, counting dense and sparse calls as they happen.

    Example:
        >>> pipe.transformer = torch.compile(pipe.transformer, backend="xattn")  # doctest: +SKIP
        >>> with xflex.sparsity(threshold=0.9) as stats, xflex.dense_warmup(pipe.transformer, steps=10) as warmup:  # doctest: +SKIP
        ...     video = pipe(prompt, num_inference_steps=50).frames[0]
        >>> warmup.dense_calls, warmup.sparse_calls, stats.density  # doctest: +SKIP
        (10, 40, 0.27)
    """
    _validate_warmup(module, steps, calls_per_step)
    state = DenseWarmup(steps=steps, calls_per_step=calls_per_step)
    # One entry per call in progress (None: not a warmup call); a stack so
    # that a re-entrant call closes its own settings.
    open_calls: list[contextlib.AbstractContextManager | None] = []

    @torch.compiler.disable
    def enter_call(_module: nn.Module, _args: tuple) -> None:
        if state.warming_up:
            settings = sparsity(enabled=False)
            settings.__enter__()
            open_calls.append(settings)
            state.dense_calls += 1
        else:
            open_calls.append(None)
            state.sparse_calls += 1

    @torch.compiler.disable
    def leave_call(_module: nn.Module, _args: tuple, _output: object) -> None:
        # always_call: also runs when forward (or a later pre-hook) raised.
        if open_calls:
            settings = open_calls.pop()
            if settings is not None:
                settings.__exit__(None, None, None)

    handles = [
        module.register_forward_pre_hook(enter_call, prepend=True),
        module.register_forward_hook(leave_call, always_call=True),
    ]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()
        while open_calls:  # left open only if a call never returned through the hooks
            settings = open_calls.pop()
            if settings is not None:
                settings.__exit__(None, None, None)
