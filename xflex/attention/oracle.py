"""Ground truth for a selection: the exact attention mass of each key block
for a few sampled query blocks (true softmax rows over all keys), and the
fewest blocks that hold a given share of it (the oracle). What recall and
oracle density in calibration and the benchmarks are measured against."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .constants import device_constant
from .backends import Backend, uses_triton
from .scoring import score_blocks

__all__ = ["exact_block_mass", "oracle_block_counts", "sample_query_blocks", "sampled_block_mass"]

_MAX_TILES_PER_BLOCK = 128  # the scorers' limit on block_size // stride


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


def exact_block_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    block_size: int,
    q_blocks: Sequence[int],
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """:func:`sampled_block_mass`, fast where the call allows: the block scorer
    at stride 1 is exact attention (a 1 x 1 tile's antidiagonal is its entry),
    so on CUDA one fused kernel gives every probe row's block masses. It takes
    calls without a mask, and causal calls whose blocks are the last ones
    (one causal alignment); other calls take :func:`sampled_block_mass`.

    Example:
        >>> q = k = torch.randn(1, 2, 512, 64)
        >>> exact_block_mass(q, k, None, True, None, 128, [2, 3]).sum(-1)
        tensor([[[1.0000, 1.0000],
                 [1.0000, 1.0000]]])
    """
    n_q = math.ceil(query.shape[2] / block_size)
    blocks = list(q_blocks)
    last_blocks = blocks == list(range(n_q - len(blocks), n_q))
    fits = block_size <= _MAX_TILES_PER_BLOCK and attn_mask is None and (last_blocks or not is_causal)
    if not fits or not uses_triton(backend, query):
        return sampled_block_mass(query, key, attn_mask, is_causal, scale, block_size, blocks)
    start = blocks[0] * block_size
    rows = query[:, :, start:] if is_causal else torch.cat([query[:, :, b * block_size : (b + 1) * block_size] for b in blocks], 2)
    # The Triton kernel: the Gluon one was never run at stride 1.
    sums = score_blocks(
        rows, key, stride=1, block_size=block_size, scale=scale, causal_offset=start if is_causal else None, backend="triton"
    )
    # Each block's rows sum to its row count (the last may be ragged): the mean row.
    counts = device_constant(tuple(min(block_size, query.shape[2] - b * block_size) for b in blocks), query.device)
    return sums / counts[:, None]


def oracle_block_counts(mass: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """The fewest key blocks per row whose true mass reaches ``threshold``.

    Args:
        mass: ``(..., nK)`` true attention mass per key block (rows sum to 1,
            or to 0 for rows that see no key), e.g. from :func:`sampled_block_mass`.
        threshold: the share of each row's mass to reach, in (0, 1]: a float,
            or a tensor of shape ``mass.shape[:-1]`` (one per row, e.g. the
            recall a selection reached there).

    Returns:
        ``(...)`` int64 block counts (the block that crosses the threshold counts).

    Example:
        >>> oracle_block_counts(torch.tensor([[0.5, 0.1, 0.4]]), 0.85)
        tensor([2])
    """
    ranked = mass.sort(-1, descending=True).values
    before = ranked.cumsum(-1) - ranked
    threshold = torch.as_tensor(threshold, dtype=mass.dtype, device=mass.device)
    threshold = threshold.unsqueeze(-1) if threshold.dim() else threshold
    # 1e-6: a selection's own recall, summed in another order, must not need one more block.
    return (before < (threshold - 1e-6) * mass.sum(-1, keepdim=True)).sum(-1)
