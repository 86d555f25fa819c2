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
import math
from collections.abc import Iterator, Sequence

import torch

__all__ = ["Calibration", "calibration", "sampled_block_mass", "sample_query_blocks"]

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
    return _ACTIVE.get()


def sample_query_blocks(num_query_blocks: int, samples: int) -> list[int]:
    """Up to ``samples`` query blocks spread evenly, the last one included."""
    if num_query_blocks <= samples:
        return list(range(num_query_blocks))
    return sorted(set(torch.linspace(0, num_query_blocks - 1, samples).round().long().tolist()))


def sampled_block_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    block_size: int,
    q_blocks: Sequence[int],
) -> torch.Tensor:
    """Exact attention mass per key block for the given query blocks.

    Args:
        query: ``(B, Hq, Lq, D)``; key ``(B, Hkv, Lk, D)`` (GQA when Hq > Hkv).
        attn_mask, is_causal, scale: as in SDPA (``is_causal`` is top-left).
        q_blocks: query block indices.

    Returns:
        ``(B, Hq, len(q_blocks), ceil(Lk / block_size))`` fp32: each query
        block's softmax rows summed per key block and averaged over its rows
        (a row sums to 1, or to 0 when the mask hides every key).
    """
    B, Hq, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    n_k = math.ceil(Lk / block_size)
    if attn_mask is not None:
        attn_mask = attn_mask[(None,) * (4 - attn_mask.dim())]  # SDPA broadcasts masks from the right
    out = torch.zeros(B, Hq, len(q_blocks), n_k, device=query.device)
    # One KV head and its query heads at a time: the fp32 logits held at once
    # are (B, Hq/Hkv, Bs, Lk), 256 MiB at 128K tokens with 4 heads per group.
    for kv_head in range(Hkv):
        heads = slice(kv_head * group, (kv_head + 1) * group)
        keys_t = key[:, kv_head, None].float().transpose(-1, -2)  # (B, 1, D, Lk)
        mask_heads = heads if attn_mask is not None and attn_mask.shape[1] > 1 else slice(None)
        for column, block in enumerate(q_blocks):
            lo, hi = block * block_size, min(Lq, (block + 1) * block_size)
            logits = (query[:, heads, lo:hi].float() @ keys_t) * scale
            if is_causal:
                hidden = torch.arange(Lk, device=query.device) > torch.arange(lo, hi, device=query.device)[:, None]
                logits = logits.masked_fill(hidden, float("-inf"))
            elif attn_mask is not None:
                mask = attn_mask[:, mask_heads]
                mask = mask if mask.shape[-2] == 1 else mask[..., lo:hi, :]
                logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
            probs = torch.softmax(logits, -1).nan_to_num(0.0)  # rows that see no key: all zero
            padded = torch.nn.functional.pad(probs, (0, n_k * block_size - Lk))
            out[:, heads, column] = padded.view(B, group, hi - lo, n_k, block_size).sum((2, 4)) / (hi - lo)
    return out
