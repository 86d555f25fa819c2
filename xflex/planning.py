"""The sparse path of one call up to attention, with a :class:`Config`:
pattern -> block scores -> selection -> BlockMask. Public for benchmarks and
power users; the xflex op runs exactly this."""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch.nn.attention.flex_attention import BlockMask

from .attention import (
    CallPattern,
    KVBlocks,
    build_block_mask,
    bucketed_flex_attention,
    call_pattern,
    forced_blocks,
    run_flex_attention,
    score_blocks,
    select_kv_blocks,
)
from .config import Config

__all__ = ["Plan", "call_forced_blocks", "call_scores", "call_selection", "plan"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the sparse path decided for one call.

    Attributes:
        pattern: the call's mask at block level (mask_mod, score_mod, visibility).
        scores: ``(B, Hq, nQ, nK)`` fp32 antidiagonal block scores.
        blocks: the selection and its FlexAttention layout.
        block_size: the BlockMask's block size.
        scale: the call's softmax scale (None: ``1/sqrt(E)``).
        for_backward: the BlockMask also carries the q-major indices gradients need.
    """

    pattern: CallPattern
    scores: torch.Tensor
    blocks: KVBlocks
    block_size: int
    scale: float | None
    for_backward: bool = False

    @functools.cached_property
    def block_mask(self) -> BlockMask:
        """The BlockMask of the selection at the call's own lengths (built on first use)."""
        return build_block_mask(
            *self.blocks.kv_layout,
            mask_mod=self.pattern.mask_mod,
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

    def density(self) -> float:
        """Computed / visible blocks (one host sync)."""
        return self.selected.sum().item() / max(1, self.visible.sum().item())

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """FlexAttention over the selected blocks, with the call's mask and scale.

        On the CPU the call runs padded to a bucket of lengths
        (``attention.cpu_buckets``), so that serving many lengths compiles a
        bounded number of kernels."""
        if query.device.type == "cpu":
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
            query, key, value, block_mask=self.block_mask, score_mod=self.pattern.score_mod, scale=self.scale
        )


def call_scores(
    query: torch.Tensor, key: torch.Tensor, pattern: CallPattern, config: Config, scale: float | None = None
) -> torch.Tensor:
    """Stage 1 for one call: antidiagonal block scores under its mask.

    Example:
        >>> pattern = call_pattern(q, k, None, True, config.block_size)   # doctest: +SKIP
        >>> scores = call_scores(q, k, pattern, config)                   # doctest: +SKIP
    """
    # Causal calls mask in the reduced space; other masks hand the scorer their
    # block visibility (None when every block is visible).
    block_visible = None
    if pattern.causal_offset is None and (pattern.mask_mod is not None or pattern.score_mod is not None):
        block_visible = pattern.visibility.any
    return score_blocks(
        query,
        key,
        stride=config.stride,
        block_size=config.block_size,
        scale=scale,
        causal_offset=pattern.causal_offset,
        block_visible=block_visible,
        backend=config.backend,
    )


def call_forced_blocks(pattern: CallPattern, q_len: int, kv_len: int, config: Config, device: torch.device) -> torch.Tensor:
    """``(1, 1, nQ, nK)`` bool: the blocks a call keeps whatever their score
    (its diagonal, widened by ``keep_recent``; the sink when causal)."""
    return forced_blocks(
        q_len,
        kv_len,
        config.block_size,
        diagonal_offset=pattern.diagonal_offset,
        keep_sink=config.keep_sink and pattern.causal,
        keep_recent=config.keep_recent,
        device=device,
    )


def call_selection(
    scores: torch.Tensor, pattern: CallPattern, q_len: int, kv_len: int, config: Config, call_name: str = ""
) -> KVBlocks:
    """Stage 2 for one call: forced blocks plus the threshold cut at the
    call's threshold (``threshold_by_call``), in FlexAttention's kv layout.

    Example:
        >>> blocks = call_selection(scores, pattern, q.shape[2], k.shape[2], config)   # doctest: +SKIP
    """
    # CPU Inductor (2.13) miscompiles captured-tensor mask_mods together with
    # full blocks: there every selected block carries the mask_mod.
    no_full_blocks = pattern.captures_tensors and scores.device.type == "cpu"
    return select_kv_blocks(
        scores,
        visible=pattern.visibility.any,
        fully_visible=None if no_full_blocks else pattern.visibility.all,
        forced=call_forced_blocks(pattern, q_len, kv_len, config, scores.device),
        threshold=config.threshold_tensor(scores.shape[1], scores.device, call_name),
        backend=config.backend,
    )


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

    Returns:
        :class:`Plan`; ``plan.attend(q, k, v)`` runs the attention.

    Example:
        >>> q = k = v = torch.randn(1, 4, 4096, 64)
        >>> p = xflex.plan(q, k, is_causal=True, config=xflex.Config(threshold=0.9))
        >>> p.selected.shape, p.attend(q, k, v).shape           # doctest: +SKIP
        (torch.Size([1, 4, 32, 32]), torch.Size([1, 4, 4096, 64]))
    """
    config = Config() if config is None else config
    pattern = call_pattern(query, key, attn_mask, is_causal, config.block_size)
    scores = call_scores(query, key, pattern, config, scale)
    blocks = call_selection(scores, pattern, query.shape[2], key.shape[2], config, call_name)
    return Plan(pattern, scores, blocks, config.block_size, scale, for_backward)
