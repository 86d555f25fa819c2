"""The sparse path of one call up to attention, with a :class:`Config`:
pattern -> block scores -> selection -> BlockMask. Public for benchmarks and
power users; the xflex op runs exactly this."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch.nn.attention.flex_attention import BlockMask

from .attention import (
    CallPattern,
    KVBlocks,
    KernelName,
    attention_kernel,
    check_block_size,
    build_block_mask,
    bucketed_flex_attention,
    call_pattern,
    exact_block_mass,
    forced_blocks,
    run_flex_attention,
    score_blocks,
    select_kv_blocks,
    text_token_blocks,
)
from .attention.constants import device_constant
from .attention.masks import visible_everywhere
from .attention.scoring import Reduction
from .attention.selection.probes import (
    PROBE_ROWS_PER_BLOCK,
    PROBE_TEMPERATURES,
    PROBE_THRESHOLDS,
    cheapest_reaching,
    probe_query_blocks,
    threshold_rule_on_probes,
)
from .attention.selection.estimates import max_alone_heads, max_alone_threshold
from .attention.selection.floor import relative_floor_blocks
from .attention.selection.slash import slash_blocks
from .attention.selection.vertical import vertical_blocks
from .config import Config

__all__ = [
    "Plan",
    "call_forced_blocks",
    "call_scores",
    "call_selection",
    "call_text_blocks",
    "call_line_blocks",
    "density_of_counts",
    "plan",
    "probe_calibration",
    "probe_density",
    "probe_mass",
    "select_from_estimates",
]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the sparse path decided for one call.

    Attributes:
        pattern: the call's mask at block level (mask_mod, score_mod, visibility).
        scores: ``(B, Hq, nQ, nK)`` fp32 block scores (the strided estimate).
        blocks: the selection and its FlexAttention layout.
        block_size: the BlockMask's block size.
        scale: the call's softmax scale (None: ``1/sqrt(E)``).
        for_backward: the BlockMask also carries the q-major indices gradients need.
        kernel: the FlexAttention kernel :meth:`attend` runs.
        lines: ``(B, Hq, 1 | nQ, nK)`` bool, the blocks the selection added
            to the threshold's: vertical and slash lines, and the other
            estimate's cut under ``scoring_reduction="mean+max"``, the relative
            floor (None: none).
    """

    pattern: CallPattern
    scores: torch.Tensor
    blocks: KVBlocks
    block_size: int
    scale: float | None
    for_backward: bool = False
    kernel: KernelName = "triton"
    lines: torch.Tensor | None = None

    @functools.cached_property
    def block_mask(self) -> BlockMask:
        """The BlockMask of the selection at the call's own lengths (built on first use)."""
        mask_mod = self.pattern.mask_mod
        if mask_mod is None and self.kernel == "flash":
            mask_mod = visible_everywhere
        return build_block_mask(
            *self.blocks.kv_layout,
            mask_mod=mask_mod,
            block_size=self.block_size,
            seq_lengths=self.pattern.shape[2:],
            for_backward=self.for_backward,
        )

    @property
    def selected(self) -> torch.Tensor:
        """``(B, Hq, nQ, nK)`` bool: the blocks computed."""
        return self.blocks.selected

    @property
    def visible(self) -> torch.Tensor:
        """``(B, Hq, nQ, nK)`` bool: the blocks the call's mask leaves visible."""
        return self.pattern.visibility.any.expand_as(self.blocks.selected)

    def block_counts(self) -> torch.Tensor:
        """``[computed, visible]`` block counts, int64 on the scores' device (no host sync)."""
        return torch.stack([self.selected.sum(), self.visible.sum()])

    def density(self) -> float:
        """Computed / visible blocks (one host sync)."""
        return density_of_counts(self.block_counts())

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, return_lse: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """FlexAttention over the selected blocks, with the call's mask and
        scale; with ``return_lse``, ``(out, lse)`` for
        ``attention.flex_attention_backward`` (CUDA only).

        On the CPU the call runs padded to a bucket of lengths
        (``attention.cpu_buckets``), so that serving many lengths compiles a
        bounded number of kernels."""
        if query.device.type == "cpu":
            if return_lse:
                raise ValueError("return_lse needs CUDA tensors: FlexAttention has no CPU backward")
            return bucketed_flex_attention(
                query,
                key,
                value,
                pattern=self.pattern,
                kv_layout=self.blocks.kv_layout,
                block_size=self.block_size,
                scale=self.scale,
            )
        return run_flex_attention(
            query,
            key,
            value,
            block_mask=self.block_mask,
            score_mod=self.pattern.score_mod,
            scale=self.scale,
            kernel=self.kernel,
            return_lse=return_lse,
        )


def density_of_counts(counts: torch.Tensor) -> float:
    """Computed / visible blocks from :meth:`Plan.block_counts` (a host sync if on a GPU)."""
    computed, visible = counts.tolist()
    return computed / max(1, visible)


def call_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    pattern: CallPattern,
    config: Config,
    scale: float | None = None,
    *,
    q_blocks: Sequence[int] | None = None,
    temperatures: Sequence[float] | None = None,
    reduction: Reduction | None = None,
) -> torch.Tensor:
    """Stage 1 for one call: block scores (the strided estimate) under its mask.

    Args:
        query, key: the call's (``query`` may be scaled per head: a temperature).
        pattern: the call's :class:`CallPattern`.
        config: stride, block size, scorer and backend.
        scale: the scorer's softmax scale (None: ``1/sqrt(E)``).
        q_blocks: score only these query blocks.
        temperatures: score at each of these multiples of ``scale`` in one
            launch (the scored rows' queries scaled, as extra heads of their
            GQA group); the result gains a leading temperature dim.
        reduction: the scorer's reduction (None: the first of ``config.reductions``).

    Returns:
        ``(B, Hq, nQ, nK)`` fp32 (``nQ``: ``len(q_blocks)`` when given),
        ``(T, B, Hq, nQ, nK)`` with ``temperatures``, or ``(2, B, Hq, nQ,
        nK)`` with ``reduction="mean+max"`` (the mean's scores first).

    Example:
        >>> pattern = call_pattern(q, k, None, True, config.block_size)   # doctest: +SKIP
        >>> scores = call_scores(q, k, pattern, config)                   # doctest: +SKIP
    """
    # Causal calls mask in the reduced space; other masks hand the scorer their
    # block visibility (None when every block is visible).
    block_visible = None
    if pattern.causal_offset is None and (pattern.mask_mod is not None or pattern.score_mod is not None):
        block_visible = pattern.visibility.any
    causal_offset = pattern.causal_offset
    bs = config.block_size
    reduction = config.reductions[0] if reduction is None else reduction
    if temperatures is not None and reduction not in ("mean", "max"):
        raise ValueError(f"temperatures take one estimate, but got reduction={reduction!r}")
    if q_blocks is not None and causal_offset is None:
        query = torch.cat([query[:, :, b * bs : (b + 1) * bs] for b in q_blocks], 2)
        block_visible = None if block_visible is None else _query_block_rows(block_visible, list(q_blocks))
    n_t = 1 if temperatures is None else len(temperatures)
    if n_t > 1 and block_visible is not None and block_visible.shape[1] > 1:
        block_visible = block_visible.repeat_interleave(n_t, dim=1)

    def score(rows: torch.Tensor, offset: int | None) -> torch.Tensor:
        if temperatures is not None:
            # Head-major (h, t) order keeps every copy of head h in its kv head's group.
            rows = torch.stack([rows * t for t in temperatures], 2).flatten(1, 2)
        scores = score_blocks(
            rows, key, stride=config.stride, block_size=bs, scale=scale, causal_offset=offset,
            block_visible=block_visible, pairing=config.scorer, reduction=reduction,
            precision=config.scoring_precision,
            backend=config.backend,
        )  # fmt: skip
        if temperatures is None:
            return scores
        return scores.unflatten(1, (-1, n_t)).movedim(2, 0)

    if q_blocks is None or causal_offset is None:
        return score(query, causal_offset)
    # Causal rows: one scorer call per run of consecutive blocks, each with its own alignment.
    runs, start = [], 0
    for i in range(1, len(q_blocks) + 1):
        if i == len(q_blocks) or q_blocks[i] != q_blocks[i - 1] + 1:
            runs.append((q_blocks[start], q_blocks[i - 1] + 1))
            start = i
    return torch.cat([score(query[:, :, first * bs : last * bs], causal_offset + first * bs) for first, last in runs], -2)


def call_forced_blocks(pattern: CallPattern, q_len: int, kv_len: int, config: Config, device: torch.device) -> torch.Tensor:
    """``(B|1, H|1, nQ, nK)`` bool: the blocks a call keeps whatever their
    score: its diagonal (widened by ``keep_recent``), the sink when causal, and
    every visible block of the rows that see at most ``dense_row_blocks``."""
    forced = forced_blocks(
        q_len,
        kv_len,
        config.block_size,
        diagonal_offset=pattern.diagonal_offset,
        keep_sink=False,  # the pattern's own sink: decided on the device for masks
        keep_recent=config.keep_recent,
        device=device,
    )
    if config.keep_sink and pattern.sink is not None:
        forced = forced | pattern.sink
    if config.dense_row_blocks == 0:
        return forced
    visible = pattern.visibility.any
    return forced | (visible & (visible.sum(-1, keepdim=True) <= config.dense_row_blocks))


def call_text_blocks(q_len: int, kv_len: int, config: Config, device: torch.device, call_name: str = "") -> torch.Tensor | None:
    """``(1, 1, nQ, nK)`` bool: the blocks a joint attention call keeps dense
    for its text tokens (``text_tokens_by_call``): every key block of a query
    block holding text, and in every row the key blocks holding text; None
    when the call has no text tokens."""
    text_tokens = config.text_tokens_for(call_name)
    if not text_tokens:
        return None
    rows = text_token_blocks(q_len, config.block_size, text_tokens=text_tokens, device=device)
    columns = text_token_blocks(kv_len, config.block_size, text_tokens=text_tokens, device=device)
    return (rows[:, None] | columns)[None, None]


def call_selection(
    scores: torch.Tensor,
    pattern: CallPattern,
    q_len: int,
    kv_len: int,
    config: Config,
    call_name: str = "",
    *,
    threshold: torch.Tensor | None = None,
    lines: torch.Tensor | None = None,
) -> KVBlocks:
    """Stage 2 for one call: forced blocks plus the threshold cut, plus the
    text blocks of a joint call and the vertical and slash lines, in
    FlexAttention's kv layout.

    Args:
        scores: the call's block scores.
        pattern, q_len, kv_len, config: the call.
        call_name: picks the threshold from ``config.threshold_by_call`` and
            the text tokens from ``config.text_tokens_by_call``.
        threshold: ``(1, H, 1, 1)`` per-head thresholds instead (what
        :func:`probe_calibration` chose).
        lines: ``(B, H, 1 | nQ, nK)`` bool blocks kept where visible
            (:func:`call_line_blocks`).

    Example:
        >>> blocks = call_selection(scores, pattern, q.shape[2], k.shape[2], config)   # doctest: +SKIP
    """
    if threshold is None:
        threshold = config.threshold_tensor(scores.shape[1], scores.device, call_name)
    forced = call_forced_blocks(pattern, q_len, kv_len, config, scores.device)
    # CPU Inductor (2.13) miscompiles captured-tensor mask_mods together with
    # full blocks: there every selected block carries the mask_mod.
    no_full_blocks = pattern.captures_tensors and scores.device.type == "cpu"
    fully_visible = None if no_full_blocks else pattern.visibility.all
    text = call_text_blocks(q_len, kv_len, config, scores.device, call_name)
    added = [x for x in (text, lines) if x is not None]
    # Added after the cut, which is made as without them (forced blocks' mass
    # would count toward tau and crowd out video blocks): both only add blocks.
    return select_kv_blocks(
        scores,
        visible=pattern.visibility.any,
        fully_visible=fully_visible,
        forced=forced,
        threshold=threshold,
        added=functools.reduce(torch.logical_or, added) if added else None,
        backend=config.backend,
    )


def _probe_blocks(q_len: int, pattern: CallPattern, config: Config) -> list[int]:
    """The call's ``config.probe_blocks`` probe query blocks (:func:`probe_query_blocks`)."""
    return probe_query_blocks(math.ceil(q_len / config.block_size), config.probe_blocks, causal=pattern.causal)


def _probe_rows(
    pattern: CallPattern, q_len: int, kv_len: int, config: Config, device: torch.device
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The call's probe query blocks and their rows of the visible and forced blocks."""
    probes = _probe_blocks(q_len, pattern, config)
    forced = call_forced_blocks(pattern, q_len, kv_len, config, device)
    return probes, _query_block_rows(pattern.visibility.any, probes), _query_block_rows(forced, probes)


def _query_block_rows(blocks: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``blocks[:, :, rows]`` without the host synchronisation that indexing a
    GPU tensor with a Python list costs (its index is copied from pageable memory)."""
    return blocks.index_select(2, device_constant(tuple(rows), blocks.device, torch.int64))


def probe_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    pattern: CallPattern,
    config: Config,
) -> torch.Tensor:
    """``(B, H, P, nK)`` exact attention mass per key block of the call's
    ``config.probe_blocks`` probe query blocks (:func:`probe_query_blocks`)."""
    probes = _probe_blocks(query.shape[2], pattern, config)
    return exact_block_mass(
        query, key, attn_mask, is_causal, scale, config.block_size, probes, rows_per_block=PROBE_ROWS_PER_BLOCK,
        backend=config.backend,
    )


def call_line_blocks(scores: torch.Tensor, mass: torch.Tensor, pattern: CallPattern, config: Config) -> torch.Tensor | None:
    """The blocks of the call's vertical lines (``config.vertical_mass``;
    ``(B, H, 1, nK)`` bool) and slash lines (``config.slash_mass``; then
    ``(B, H, nQ, nK)``), from its block scores and its probe rows'
    :func:`probe_mass`; None where both rules are off.

    Example:
        >>> lines = call_line_blocks(scores, probe_mass(q, k, None, True, None, pattern, config), pattern, config)   # doctest: +SKIP
    """
    probes = _probe_blocks(pattern.shape[2], pattern, config)
    probe_scores, probe_visible = _query_block_rows(scores, probes), _query_block_rows(pattern.visibility.any, probes)
    slash = vertical = None
    if config.slash_mass > 0:
        slash = slash_blocks(mass, probe_scores, probe_visible, probes, n_query_blocks=scores.shape[2], min_mass=config.slash_mass)
    if config.vertical_mass > 0:
        probe_slash = None if slash is None else _query_block_rows(slash, probes)
        vertical = vertical_blocks(mass, probe_scores, probe_visible, probes, min_mass=config.vertical_mass, slash=probe_slash)
    if slash is None or vertical is None:
        return vertical if slash is None else slash
    return slash | vertical


def probe_calibration(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    pattern: CallPattern,
    config: Config,
    target: torch.Tensor,
    *,
    mass: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``"adaptive"`` method's choice for one call: per head, the scorer
    temperature and threshold whose selection keeps ``target`` of the true
    attention mass on ``config.probe_blocks`` probe query blocks, with the
    fewest blocks (no host synchronisation).

    Args:
        query, key, attn_mask, is_causal, scale: the call's SDPA arguments.
        pattern, config: the call's pattern and settings.
        target: ``(1, H, 1, 1)`` the recall each query head must reach.
        mass: the probe rows' :func:`probe_mass`, when the caller has it already.

    Returns:
        ``(temperature, threshold)``, each ``(1, H, 1, 1)`` fp32.

    Example:
        >>> t, tau = probe_calibration(q, k, None, True, None, pattern, config, target)   # doctest: +SKIP
    """
    probes, visible, forced = _probe_rows(pattern, query.shape[2], key.shape[2], config, query.device)
    if mass is None:
        mass = probe_mass(query, key, attn_mask, is_causal, scale, pattern, config)
    softmax_scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    temperatures = [t for t in PROBE_TEMPERATURES if t <= config.stride]
    scores = call_scores(query, key, pattern, config, softmax_scale, q_blocks=probes, temperatures=temperatures)
    thresholds = device_constant(PROBE_THRESHOLDS, query.device)
    recall, kept = threshold_rule_on_probes(scores, mass, visible=visible, forced=forced, thresholds=thresholds)
    # (thresholds, temperatures, B, H, P) -> per head, over batch and probe rows
    cost = kept / visible.expand_as(mass).sum(-1).clamp_min(1)
    best = cheapest_reaching(recall.mean((2, 4)).flatten(0, 1), cost.mean((2, 4)).flatten(0, 1), target.view(-1))
    temperature = device_constant(tuple(temperatures), query.device)[best % len(temperatures)]
    return temperature.view(1, -1, 1, 1), thresholds[best // len(temperatures)].view(1, -1, 1, 1)


def select_from_estimates(
    estimates: torch.Tensor,
    mass: torch.Tensor | None,
    pattern: CallPattern,
    q_len: int,
    kv_len: int,
    config: Config,
    call_name: str = "",
    *,
    threshold: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVBlocks, torch.Tensor | None]:
    """Stage 2 from the scorer's output: under ``"mean+max"`` each head's
    estimate (:func:`max_alone_heads`) and the union, the vertical and slash
    lines, the relative floor, then :func:`call_selection`.

    Args:
        estimates: :func:`call_scores`' ``(B, H, nQ, nK)``, or ``(2, B, H,
            nQ, nK)`` under ``"mean+max"``.
        mass: the probe rows' :func:`probe_mass` (None: no lines).
        pattern, q_len, kv_len, config, call_name: the call.
        threshold: ``(1, H, 1, 1)`` per-head thresholds (None: the config's for the call).

    Returns:
        ``(scores, blocks, lines)``: the scores each head's cut read, the
        selection, and what was added to the cut (:attr:`Plan.lines`).

    Example:
        >>> scores, blocks, lines = select_from_estimates(call_scores(q, k, pattern, config), None, pattern, 4096, 4096, config)   # doctest: +SKIP
    """
    if threshold is None:
        threshold = config.threshold_tensor(estimates.shape[-3], estimates.device, call_name)
    scores, others, max_kept = estimates, (), None
    if estimates.dim() == 5:

        def cut(estimate: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
            return call_selection(estimate, pattern, q_len, kv_len, config, call_name, threshold=tau).selected

        scores, most, max_kept = _combined_estimates(estimates, config, threshold, cut)
        others = (most,)
    finds_lines = mass is not None and (config.vertical_mass > 0 or config.slash_mass > 0)
    lines = call_line_blocks(scores, mass, pattern, config) if finds_lines else None
    if max_kept is not None:
        lines = max_kept if lines is None else lines | max_kept
    if config.relative_floor > 0:
        for estimate in (scores, *others):
            floor = relative_floor_blocks(estimate, pattern.visibility.any, config.relative_floor)
            lines = floor if lines is None else lines | floor
    blocks = call_selection(scores, pattern, q_len, kv_len, config, call_name, threshold=threshold, lines=lines)
    return scores, blocks, lines


def _combined_estimates(
    estimates: torch.Tensor,
    config: Config,
    threshold: torch.Tensor,
    cut: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``scoring_reduction="mean+max"``, from the ``(2, B, H, nQ, nK)``
    estimates (mean first), the per-head ``threshold`` and the threshold
    ``cut`` (scores, threshold to kept blocks): the scores each head's cut
    and lines read (the max's on the heads :func:`max_alone_heads` picks
    under ``config.max_alone_ratio``, else the mean's), the max's scores,
    and the blocks the max's cut adds: on the other heads its cut at
    ``threshold`` (the union), on those heads its cut at
    :func:`max_alone_threshold`."""
    mean, most = estimates[0], estimates[1]
    max_kept = cut(most, threshold)
    if config.max_alone_ratio == 0:
        return mean, most, max_kept
    alone = max_alone_heads(cut(mean, threshold), max_kept, config.max_alone_ratio)
    strict = cut(most, max_alone_threshold(threshold))
    return torch.where(alone, most, mean), most, torch.where(alone, strict, max_kept)


def probe_density(
    query: torch.Tensor,
    key: torch.Tensor,
    pattern: CallPattern,
    config: Config,
    call_name: str = "",
    *,
    scale: float | None = None,
) -> float:
    """The density (kept / visible blocks) of the threshold selection on
    ``config.probe_blocks`` probe query blocks (:func:`probe_query_blocks`):
    a forecast of the whole call's density at a few rows' scoring cost
    (under ``"mean+max"``, of the union or the max's cut as the plan chooses
    per head). The vertical lines (``config.vertical_mass``) are left out: they add few
    blocks (bench/RESULTS.md, "Vertical lines"), and the exact pass over the
    probe rows that finds them would be paid again by the sparse call.

    Example:
        >>> q = k = torch.randn(1, 2, 1024, 64)
        >>> probe_density(q, k, call_pattern(q, k, None, True, 128), Config(threshold=1.0))
        1.0
    """
    probes, visible, forced = _probe_rows(pattern, query.shape[2], key.shape[2], config, query.device)
    both = len(config.reductions) > 1
    scores = call_scores(query, key, pattern, config, scale, q_blocks=probes, reduction=config.scoring_reduction if both else None)
    visible = visible.expand_as(scores[0] if both else scores)
    threshold = config.threshold_tensor(query.shape[1], query.device, call_name)

    def cut(estimate: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return select_kv_blocks(
            estimate, visible=visible, fully_visible=None, forced=forced, threshold=tau, backend=config.backend
        ).selected

    if both:
        scores, _, max_kept = _combined_estimates(scores, config, threshold, cut)
        selected = cut(scores, threshold) | max_kept
    else:
        selected = cut(scores, threshold)
    return (selected.sum() / visible.sum().clamp_min(1)).item()


def plan(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    config: Config | None = None,
    call_name: str = "",
    for_backward: bool = False,
    value_head_dim: int | None = None,
    pattern: CallPattern | None = None,
) -> Plan:
    """Score, select and build the BlockMask for one attention call, as the
    xflex op does when the call runs sparse (``config`` as given: active
    ``xflex.sparsity()`` overrides are not applied here).

    Args:
        query: ``(B, Hq, Lq, E)``; key ``(B, Hkv, Lk, E)`` (``Hq`` a multiple of ``Hkv``).
        attn_mask, is_causal, scale: as in ``F.scaled_dot_product_attention``.
        config: settings (default ``Config()``).
        call_name: picks the call's threshold from ``config.threshold_by_call``.
        for_backward: also build the BlockMask's q-major indices (for gradients).
        value_head_dim: the value's head dim when it differs from the query's
            (the FLASH kernel needs them equal).
        pattern: the call's :func:`call_pattern`, when the caller has it already.

    Returns:
        :class:`Plan`; ``plan.attend(q, k, v)`` runs the attention.

    Example:
        >>> import xflex
        >>> q = k = v = torch.randn(1, 4, 4096, 64)
        >>> p = xflex.plan(q, k, is_causal=True, config=xflex.Config(threshold=0.9))
        >>> p.selected.shape, p.attend(q, k, v).shape           # doctest: +SKIP
        (torch.Size([1, 4, 32, 32]), torch.Size([1, 4, 4096, 64]))
    """
    config = Config() if config is None else config
    check_block_size(query.device, config.block_size)
    if pattern is None:
        pattern = call_pattern(query, key, attn_mask, is_causal, config.block_size)
    threshold = config.threshold_tensor(query.shape[1], query.device, call_name)
    sparse = config.threshold_for(call_name) != 1.0
    adaptive = config.method == "adaptive" and sparse
    finds_lines = (config.vertical_mass > 0 or config.slash_mass > 0) and sparse
    mass = probe_mass(query, key, attn_mask, is_causal, scale, pattern, config) if adaptive or finds_lines else None
    scoring_query = query
    if adaptive:
        temperature, threshold = probe_calibration(query, key, attn_mask, is_causal, scale, pattern, config, threshold, mass=mass)
        # Temperatures are powers of two: exact in any float dtype.
        scoring_query = query * temperature.to(query.dtype)
    both = len(config.reductions) > 1 and sparse  # "mean+max": both estimates from one scorer pass
    estimates = call_scores(scoring_query, key, pattern, config, scale, reduction=config.scoring_reduction if both else None)
    lines_mass = mass if finds_lines else None
    scores, blocks, lines = select_from_estimates(
        estimates, lines_mass, pattern, query.shape[2], key.shape[2], config, call_name, threshold=threshold
    )
    kernel = attention_kernel(
        config.attention_kernel,
        query,
        key_length=key.shape[2],
        value_head_dim=query.shape[-1] if value_head_dim is None else value_head_dim,
        block_size=config.block_size,
        captures_tensors=pattern.captures_tensors,
        needs_grad=for_backward,
    )
    return Plan(pattern, scores, blocks, config.block_size, scale, for_backward, kernel, lines)
