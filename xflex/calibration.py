"""Per-call threshold calibration: measure, on real inputs, how much of the
true attention mass each call's selection keeps at several thresholds, and
pick per call the smallest threshold that keeps enough (``threshold_by_call``).

The antidiagonal estimate is weaker in some layers than in others (SmolLM2's
layers 3-10 keep 0.68-0.77 of the mass at tau 0.9 where others keep 0.9+, see
bench/RESULTS.md); one global tau either starves those layers or wastes blocks
everywhere else.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import glob
from collections.abc import Iterator, Sequence

import torch

from .attention import SdpaArgs, sample_query_blocks, sampled_block_mass, select_blocks
from .config import Config
from .planning import Plan, call_forced_blocks, call_text_blocks

__all__ = ["Calibration", "active_calibrations", "calibration"]

DEFAULT_THRESHOLDS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)

_ACTIVE: contextvars.ContextVar[tuple[Calibration, ...]] = contextvars.ContextVar("xflex_calibrations", default=())


@dataclasses.dataclass
class Calibration:
    """Recall of each sparse call's selection at each candidate threshold.

    Attributes:
        target_recall: the share of the true attention mass a call must keep.
        thresholds: candidate taus, ascending.
        samples: query blocks per call whose exact attention is computed.
        recalls: per call name, one ``(len(thresholds),)`` device tensor per
            call made (mean over batch, heads and sampled query blocks).
    """

    target_recall: float
    thresholds: tuple[float, ...]
    samples: int
    recalls: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)

    def recall_by_call(self) -> dict[str, dict[float, float]]:
        """``{call name: {tau: mean recall over its calls}}`` (one host sync)."""
        return {
            name: dict(zip(self.thresholds, torch.stack(values).mean(0).tolist())) for name, values in self.recalls.items()
        }

    @property
    def threshold_by_call(self) -> dict[str, float]:
        """Per call, the smallest threshold whose recall reaches the target (the
        largest candidate where none does), ready for the ``threshold_by_call``
        option: names are escaped so that each matches only itself."""
        chosen = {}
        for name, by_tau in self.recall_by_call().items():
            reaching = [tau for tau, recall in by_tau.items() if recall >= self.target_recall]
            chosen[glob.escape(name)] = reaching[0] if reaching else self.thresholds[-1]
        return chosen

    def measure(self, call_name: str, args: SdpaArgs, plan: Plan, config: Config) -> None:
        """Record one sparse call: the true attention mass inside the blocks its
        selection keeps at each candidate threshold, on sampled query blocks."""
        scores, pattern = plan.scores, plan.pattern
        q_blocks = sample_query_blocks(scores.shape[2], self.samples)
        mass = sampled_block_mass(
            args.query, args.key, args.attn_mask, args.is_causal, args.scale, config.block_size, q_blocks
        )
        rows_that_see = mass.sum(-1) > 0
        forced = call_forced_blocks(pattern, args.q_len, args.kv_len, config, scores.device)
        sampled = dict(visible=pattern.visibility.any[:, :, q_blocks], forced=forced[:, :, q_blocks])
        text = call_text_blocks(args.q_len, args.kv_len, config, scores.device, call_name)
        text = False if text is None else text[:, :, q_blocks]  # joint calls keep these too
        kept = [select_blocks(scores[:, :, q_blocks], threshold=tau, **sampled) | text for tau in self.thresholds]
        recalls = torch.stack([(mass * blocks).sum(-1)[rows_that_see].mean() for blocks in kept])
        self.recalls.setdefault(call_name, []).append(recalls)


@contextlib.contextmanager
def calibration(
    target_recall: float = 0.9, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, samples: int = 8
) -> Iterator[Calibration]:
    """Measure every sparse xflex call made inside the block (it still runs as
    usual; dense fallbacks are not measured). Each call also computes exact
    attention for ``samples`` query blocks, so calibrate on a few inputs, not
    in production.

    Yields:
        :class:`Calibration`; its ``threshold_by_call`` goes to
        ``xflex.sparsity(threshold_by_call=...)`` or the compile options.

    Example:
        >>> with xflex.calibration(target_recall=0.9) as cal:     # doctest: +SKIP
        ...     model(calibration_batch)
        >>> with xflex.sparsity(threshold_by_call=cal.threshold_by_call):  # doctest: +SKIP
        ...     out = model(x)
    """
    if not (isinstance(target_recall, (int, float)) and 0.0 < target_recall <= 1.0):
        raise ValueError(f"target_recall must be a float in (0, 1], but got {target_recall!r}")
    taus = tuple(thresholds)
    if not taus or any(not isinstance(t, (int, float)) or not 0.0 < t <= 1.0 for t in taus) or list(taus) != sorted(taus):
        raise ValueError(f"thresholds must be an ascending non-empty sequence of floats in (0, 1], but got {thresholds!r}")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, but got {samples!r}")
    cal = Calibration(float(target_recall), tuple(float(t) for t in taus), samples)
    token = _ACTIVE.set(_ACTIVE.get() + (cal,))
    try:
        yield cal
    finally:
        _ACTIVE.reset(token)


def active_calibrations() -> tuple[Calibration, ...]:
    """The ``calibration()`` blocks the current call runs inside."""
    return _ACTIVE.get()
