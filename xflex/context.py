"""`xflex.sparsity(...)`: run-time settings for the attention calls made
inside a `with` block, read by the xflex op when it runs (no recompilation)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from .config import RUNTIME_OPTIONS, Config
from .stats import CallRecord, SparsityStats

__all__ = ["sparsity", "effective_config", "record_call"]

_OVERRIDES: contextvars.ContextVar[tuple[dict[str, object], ...]] = contextvars.ContextVar(
    "xflex_overrides", default=()
)
_RECORDERS: contextvars.ContextVar[tuple[SparsityStats, ...]] = contextvars.ContextVar(
    "xflex_recorders", default=()
)
# Run-time values are checked against the largest block size; the op checks
# them again against the compiled model's own block size.
_VALIDATION_BASE = Config(block_size=256)


@contextlib.contextmanager
def sparsity(**overrides: object) -> Iterator[SparsityStats]:
    """Change xflex settings for the attention calls inside the block.

    Accepts any option but ``block_size`` (fixed at compile time): ``enabled``,
    ``threshold`` (float in (0, 1] or one per query head),
    ``threshold_by_call`` (``{call-name pattern: threshold}``), ``stride``,
    ``min_seq_len``, ``keep_sink``, ``keep_recent``, ``scorer``. Nested blocks:
    the inner value wins, the outer is restored on exit (also on exceptions).
    The compiled model is not recompiled.

    Yields:
        :class:`SparsityStats` covering the calls made inside the block.

    Example:
        >>> with xflex.sparsity(threshold=0.95, stride=16) as stats:
        ...     out = model(x)                       # doctest: +SKIP
        >>> stats.density                            # doctest: +SKIP
        0.31
    """
    unknown = sorted(set(overrides) - set(RUNTIME_OPTIONS))
    if unknown:
        raise ValueError(
            f"xflex.sparsity() got unknown or compile-time option(s) {unknown}; "
            f"expected some of {sorted(RUNTIME_OPTIONS)} (block_size is set in torch.compile options)"
        )
    validated = Config.from_options(overrides, base=_VALIDATION_BASE)
    values = {name: getattr(validated, name) for name in overrides}
    stats = SparsityStats()
    override_token = _OVERRIDES.set(_OVERRIDES.get() + (values,))
    recorder_token = _RECORDERS.set(_RECORDERS.get() + (stats,))
    try:
        yield stats
    finally:
        _RECORDERS.reset(recorder_token)
        _OVERRIDES.reset(override_token)


def effective_config(defaults: Config) -> Config:
    """The compile-time defaults with every active ``sparsity()`` override applied
    (outermost first, so the innermost wins)."""
    config = defaults
    for values in _OVERRIDES.get():
        config = config.override(values)
    return config


def recording() -> bool:
    return bool(_RECORDERS.get())


def record_call(record: CallRecord) -> None:
    for stats in _RECORDERS.get():
        stats.records.append(record)
