"""`xflex.sparsity(...)`: run-time settings for the attention calls made
inside a `with` block, read by the xflex op when it runs (no recompilation),
and the stats handles those calls report to."""

from __future__ import annotations

import contextlib
import contextvars
import enum
from collections.abc import Iterator, Mapping, Sequence

from .attention.backends import Backend
from .attention.flex import AttentionKernel
from .attention.scoring import Pairing, Precision
from .config import Config, Method, ScoringReduction
from .stats import CallRecord, SparsityStats

__all__ = ["UNSET", "effective_config", "record_call", "recording", "sparsity"]


class _Unset(enum.Enum):
    """A keyword left out of :func:`sparsity` (keeps "not given" apart from any value)."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset.UNSET

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
def sparsity(
    *,
    enabled: bool | _Unset = UNSET,
    method: Method | _Unset = UNSET,
    scorer: Pairing | _Unset = UNSET,
    scoring_precision: Precision | _Unset = UNSET,
    scoring_reduction: ScoringReduction | _Unset = UNSET,
    threshold: float | Sequence[float] | _Unset = UNSET,
    probe_blocks: int | _Unset = UNSET,
    vertical_mass: float | _Unset = UNSET,
    slash_mass: float | _Unset = UNSET,
    relative_floor: float | _Unset = UNSET,
    max_alone_ratio: float | _Unset = UNSET,
    threshold_by_call: Mapping[str, float | Sequence[float]] | _Unset = UNSET,
    text_tokens_by_call: Mapping[str, int] | _Unset = UNSET,
    stride: int | _Unset = UNSET,
    min_seq_len: int | _Unset = UNSET,
    keep_sink: bool | _Unset = UNSET,
    keep_recent: int | _Unset = UNSET,
    dense_row_blocks: int | _Unset = UNSET,
    backend: Backend | _Unset = UNSET,
    attention_kernel: AttentionKernel | _Unset = UNSET,
    break_even: bool | _Unset = UNSET,
) -> Iterator[SparsityStats]:
    """Change xflex settings for the attention calls inside the block.

    Every option of :class:`xflex.Config` but ``block_size`` (fixed when the
    model is compiled); options left out keep the surrounding value. Nested
    blocks: the inner value wins, the outer comes back on exit (also on
    exceptions). The compiled model is not recompiled.

    Args:
        enabled: False runs every call as the model's own dense SDPA.
        method: "threshold" or "adaptive" (see ``xflex.Config``).
        scorer: the estimate's tile pairing, "antidiagonal" or "interleaved".
        scoring_precision: "input" or "fp8" (q and k rounded to e4m3 for the estimate).
        scoring_reduction: "mean" or "max" of each tile's S products, or
            "mean+max": the blocks either keeps (see ``xflex.Config``).
        threshold: tau in (0, 1], or one per query head.
        probe_blocks: query blocks per call that find vertical lines and calibrate the adaptive method.
        vertical_mass: keep in every row the key blocks holding at least this
            much more true mass on the probe rows than the estimate says (0: off).
        slash_mass: the same for block diagonals, kept in every row (0: off).
        relative_floor: also keep blocks whose estimated score reaches this
            fraction of their row's largest (0: off).
        max_alone_ratio: under "mean+max", heads whose mean cut keeps more
            than this many times the max's blocks keep the max's alone (0: off).
        threshold_by_call: ``{call-name pattern: threshold}`` (``fnmatch``).
        text_tokens_by_call: ``{call-name pattern: n}``: joint-attention calls
            whose first ``n`` (``n < 0``: last ``-n``) tokens are text, kept dense.
        stride: the estimate's stride S, a divisor of the block size.
        min_seq_len: calls with fewer keys run dense.
        keep_sink: causal calls always keep key block 0.
        keep_recent: tokens before each query whose blocks are always kept.
        dense_row_blocks: query blocks that see at most this many key blocks keep them all.
        backend: "auto", "torch", "triton" or "gluon".
        attention_kernel: "auto", "triton" or "flash" (FlexAttention's kernel).
        break_even: run dense where the GPU's measured costs say sparse would not pay.

    Yields:
        :class:`SparsityStats` covering the calls made inside the block.

    Example:
        >>> with xflex.sparsity(threshold=0.95, stride=16) as stats:
        ...     out = model(x)                       # doctest: +SKIP
        >>> stats.density                            # doctest: +SKIP
        0.31
    """
    given = dict(
        enabled=enabled,
        method=method,
        scorer=scorer,
        scoring_precision=scoring_precision,
        scoring_reduction=scoring_reduction,
        threshold=threshold,
        probe_blocks=probe_blocks,
        vertical_mass=vertical_mass,
        slash_mass=slash_mass,
        relative_floor=relative_floor,
        max_alone_ratio=max_alone_ratio,
        threshold_by_call=threshold_by_call,
        text_tokens_by_call=text_tokens_by_call,
        stride=stride,
        min_seq_len=min_seq_len,
        keep_sink=keep_sink,
        keep_recent=keep_recent,
        dense_row_blocks=dense_row_blocks,
        backend=backend,
        attention_kernel=attention_kernel,
        break_even=break_even,
    )
    overrides = {name: value for name, value in given.items() if value is not UNSET}
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
    """Whether some ``sparsity()`` block is collecting stats."""
    return bool(_RECORDERS.get())


def record_call(record: CallRecord) -> None:
    """Report one call to every enclosing ``sparsity()`` block's stats."""
    for stats in _RECORDERS.get():
        stats.records.append(record)
