"""Offline calibration for the ``"threshold"`` method: measure, on a few
of the user's own inputs, how much of the true attention mass each call's
selection keeps at several thresholds, per query head, and pick per call and
head the smallest threshold that keeps enough (``threshold_by_call``).

The estimate is weaker in some layers and heads than in others (SmolLM2's
layers 3-10 keep 0.68-0.77 of the mass at tau 0.9 where others keep 0.9+,
bench/RESULTS.md, "Selection quality"); one global tau either starves them
or wastes blocks everywhere else. The ``"adaptive"`` method makes this choice
per call at run time instead; calibration makes it once, so that the cheaper
``"threshold"`` method runs with it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import glob
import time
from collections.abc import Iterator, Sequence

import torch

from .attention import SdpaArgs, sample_query_blocks, sampled_block_mass
from .config import Config
from .planning import Plan, call_scores, probe_mass, select_from_estimates

__all__ = ["Calibration", "active_calibrations", "calibration"]

DEFAULT_THRESHOLDS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 1.0)

_ACTIVE: contextvars.ContextVar[tuple[Calibration, ...]] = contextvars.ContextVar("xflex_calibrations", default=())


@dataclasses.dataclass
class Calibration:
    """Recall of each sparse call's threshold selection at each candidate
    threshold, per query head.

    Attributes:
        target_recall: the share of the true attention mass a call must keep.
        thresholds: candidate taus, ascending.
        samples: query blocks per call whose exact attention is computed.
        recalls: per call name, one ``(len(thresholds), Hq)`` device tensor per
            call made (mean over batch and sampled query blocks).
        scorer, scoring_reduction: the scorer and reduction the calls were
            measured with (the thresholds hold for them).
        seconds: wall time spent inside the ``calibration()`` block.
    """

    target_recall: float
    thresholds: tuple[float, ...]
    samples: int
    recalls: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    scorer: str | None = None
    scoring_reduction: str | None = None
    seconds: float = 0.0

    def recall_by_call(self) -> dict[str, dict[float, float]]:
        """``{call name: {tau: mean recall over its calls and heads}}`` (one host sync)."""
        return {name: dict(zip(self.thresholds, torch.stack(values).mean((0, 2)).tolist())) for name, values in self.recalls.items()}

    def recall_by_call_and_head(self) -> dict[str, list[dict[float, float]]]:
        """``{call name: [{tau: mean recall over its calls}, one per query head]}``."""
        return {
            name: [dict(zip(self.thresholds, head)) for head in torch.stack(values).mean(0).T.tolist()]
            for name, values in self.recalls.items()
        }

    @property
    def threshold_by_call(self) -> dict[str, float | tuple[float, ...]]:
        """Per call, per query head the smallest threshold whose recall reaches
        the target (the largest candidate where none does), ready for the
        ``threshold_by_call`` option: one float where every head agrees, else
        one per head; names are escaped so that each matches only itself."""
        chosen = {}
        for name, heads in self.recall_by_call_and_head().items():
            taus = tuple(
                next((tau for tau, recall in by_tau.items() if recall >= self.target_recall), self.thresholds[-1])
                for by_tau in heads
            )
            chosen[glob.escape(name)] = taus[0] if len(set(taus)) == 1 else taus
        return chosen

    @property
    def options(self) -> dict[str, object]:
        """Settings for ``xflex.sparsity(**cal.options)`` or ``torch.compile(...,
        options=cal.options)``: the threshold method with the calibrated
        thresholds and the scorer and reduction they were measured with."""
        return {
            "method": "threshold",
            "scorer": self.scorer or Config().scorer,
            "scoring_reduction": self.scoring_reduction or Config().scoring_reduction,
            "threshold_by_call": self.threshold_by_call,
        }

    def measure(self, call_name: str, args: SdpaArgs, plan: Plan, config: Config) -> None:
        """Record one sparse call: the true attention mass inside the blocks the
        threshold selection keeps at each candidate threshold, per head, on
        sampled query blocks."""
        for name, seen in (("scorer", self.scorer), ("scoring_reduction", self.scoring_reduction)):
            if seen not in (None, getattr(config, name)):
                raise ValueError(
                    f"calibration() measured calls with {name}={seen!r} and now {name}={getattr(config, name)!r}: "
                    f"its thresholds hold for one {name}; calibrate each in a block of its own"
                )
        self.scorer, self.scoring_reduction = config.scorer, config.scoring_reduction
        pattern = plan.pattern
        # The adaptive method scores at its own temperatures: measure the plain
        # estimate, and replay the whole selection rule at each tau (under
        # "mean+max" which estimate each head keeps depends on tau).
        estimates = call_scores(args.query, args.key, pattern, config, args.scale, reduction=config.scoring_reduction)
        lines_mass = None
        if config.vertical_mass > 0 or config.slash_mass > 0:
            lines_mass = probe_mass(args.query, args.key, args.attn_mask, args.is_causal, args.scale, pattern, config)
        q_blocks = sample_query_blocks(estimates.shape[-2], self.samples)
        mass = sampled_block_mass(
            args.query, args.key, args.attn_mask, args.is_causal, args.scale, config.block_size, q_blocks
        )
        sees = (mass.sum(-1) > 0).float()  # (B, H, P): rows that see no key do not count
        heads = args.query.shape[1]

        def recall(tau: float) -> torch.Tensor:
            threshold = torch.full((1, heads, 1, 1), tau, device=estimates.device)
            _, blocks, _ = select_from_estimates(
                estimates, lines_mass, pattern, args.q_len, args.kv_len, config, call_name, threshold=threshold
            )
            kept = (mass * blocks.selected[:, :, q_blocks]).sum(-1)
            return (kept * sees).sum((0, 2)) / sees.sum((0, 2)).clamp_min(1)

        recalls = torch.stack([recall(tau) for tau in self.thresholds])
        self.recalls.setdefault(call_name, []).append(recalls)


@contextlib.contextmanager
def calibration(
    target_recall: float = 0.95, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, samples: int = 8
) -> Iterator[Calibration]:
    """Measure every sparse xflex call made inside the block (it still runs as
    usual; dense fallbacks are not measured). Each call also computes exact
    attention for ``samples`` query blocks, so calibrate on a few inputs, not
    in production; ``cal.seconds`` says how long it took.

    Args:
        target_recall: the share of true attention mass each call and head must keep.
        thresholds: candidate taus, ascending (1.0 keeps every visible block).
        samples: query blocks per call whose exact attention is computed.

    Yields:
        :class:`Calibration`; ``cal.options`` goes to ``xflex.sparsity(**cal.options)``
        or ``torch.compile(..., options=cal.options)``.

    Example:
        >>> with xflex.calibration(target_recall=0.95) as cal:     # doctest: +SKIP
        ...     model(calibration_batch)
        >>> with xflex.sparsity(**cal.options):                    # doctest: +SKIP
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
    start = time.perf_counter()
    try:
        yield cal
    finally:
        cal.seconds = time.perf_counter() - start
        _ACTIVE.reset(token)


def active_calibrations() -> tuple[Calibration, ...]:
    """The ``calibration()`` blocks the current call runs inside."""
    return _ACTIVE.get()
