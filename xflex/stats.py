"""Per-call records of what xflex did: computed vs visible blocks, kept on the
device until read, and the reason for each dense fallback."""

from __future__ import annotations

import collections
import dataclasses
import re

import torch

__all__ = ["CallRecord", "SparsityStats"]


@dataclasses.dataclass
class CallRecord:
    """One attention call.

    Attributes:
        name: the SDPA call site (graph node name, module path when known).
        query_shape, key_shape: shapes of q and k.
        dense_reason: why the call ran dense SDPA, or None if it ran sparse.
        selected_blocks, visible_blocks: ``(Hq,)`` int64 device tensors: blocks
            computed and blocks visible (not masked out entirely), summed over
            batch and query blocks. None for dense calls.
    """

    name: str
    query_shape: tuple[int, ...]
    key_shape: tuple[int, ...]
    dense_reason: str | None = None
    selected_blocks: torch.Tensor | None = None
    visible_blocks: torch.Tensor | None = None

    @property
    def sparse(self) -> bool:
        return self.dense_reason is None

    @property
    def head_density(self) -> list[float] | None:
        """Computed / visible blocks per query head (host sync), None if dense."""
        if not self.sparse:
            return None
        return (self.selected_blocks.double() / self.visible_blocks.clamp_min(1).double()).tolist()


def _sparse_totals(records: list[CallRecord]) -> tuple[int, int]:
    sparse = [r for r in records if r.sparse]
    if not sparse:
        return 0, 0
    selected = torch.stack([r.selected_blocks.sum().cpu() for r in sparse]).sum()
    visible = torch.stack([r.visible_blocks.sum().cpu() for r in sparse]).sum()
    return int(selected), int(visible)


@dataclasses.dataclass
class SparsityStats:
    """What the attention calls inside one ``xflex.sparsity()`` block did.

    ``density`` is computed / visible blocks over the calls that ran sparse;
    calls that ran dense are listed in ``dense_calls`` with their reasons and
    are not counted as density 1. When no call ran sparse, ``density`` is None
    and the printed stats say why (``dense_reasons()``), rather than a number
    that would mix the two kinds of call.

    Example:
        >>> with xflex.sparsity(enabled=False) as stats:   # doctest: +SKIP
        ...     model(x)
        >>> stats                                          # doctest: +SKIP
        SparsityStats(no call ran sparse; 30 dense: 30 x sparsity disabled)
    """

    records: list[CallRecord] = dataclasses.field(default_factory=list)

    @property
    def density(self) -> float | None:
        """Fraction of visible blocks computed over the sparse calls (None when
        no call ran sparse: see ``dense_calls``)."""
        selected, visible = self.block_totals()
        return selected / visible if visible else None

    def block_totals(self) -> tuple[int, int]:
        """(computed, visible) blocks summed over the sparse calls (host sync)."""
        return _sparse_totals(self.records)

    @property
    def sparse_calls(self) -> list[CallRecord]:
        return [r for r in self.records if r.sparse]

    @property
    def dense_calls(self) -> list[CallRecord]:
        return [r for r in self.records if not r.sparse]

    def density_by_call(self) -> dict[str, float]:
        """Density per call site (e.g. per layer), over all its sparse calls."""
        by_name: dict[str, list[CallRecord]] = {}
        for record in self.sparse_calls:
            by_name.setdefault(record.name, []).append(record)
        out = {}
        for name, records in by_name.items():
            selected, visible = _sparse_totals(records)
            out[name] = selected / visible if visible else float("nan")
        return out

    def dense_reasons(self) -> list[tuple[str, int]]:
        """Dense-fallback reasons with their call counts, most frequent first;
        lengths in the reasons read ``N`` so that decode steps at growing key
        lengths count as one reason."""
        reasons = collections.Counter(re.sub(r"\blength \d+", "length N", r.dense_reason or "") for r in self.dense_calls)
        return reasons.most_common()

    def __repr__(self) -> str:
        dense = self.dense_calls
        reasons = ", ".join(f"{count} x {reason}" for reason, count in self.dense_reasons())
        dense_part = f"{len(dense)} dense: {reasons}" if dense else "0 dense"
        density = self.density
        if density is None:
            return f"SparsityStats(no call ran sparse; {dense_part})"
        return f"SparsityStats(density={density:.3f} over {len(self.sparse_calls)} sparse calls; {dense_part})"
