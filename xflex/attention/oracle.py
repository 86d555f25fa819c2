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

__all__ = ["exact_block_mass", "oracle_block_counts", "query_block_rows", "sample_query_blocks", "sampled_block_mass"]


def sample_query_blocks(num_query_blocks: int, samples: int) -> list[int]:
    """Up to ``samples`` query blocks spread evenly, the last one included."""
    if num_query_blocks <= samples:
        return list(range(num_query_blocks))
    return sorted(set(torch.linspace(0, num_query_blocks - 1, samples).round().long().tolist()))


def query_block_rows(q_len: int, block_size: int, block: int, rows_per_block: int | None) -> list[int]:
    """The rows of query block ``block`` that stand for it: all of them, or
    ``rows_per_block`` evenly spaced ones, the block's last row included.

    Example:
        >>> query_block_rows(300, 128, 1, 4), query_block_rows(300, 128, 2, None)[:3]
        ([159, 191, 223, 255], [256, 257, 258])
    """
    lo, count = block * block_size, min(block_size, q_len - block * block_size)
    if rows_per_block is None or rows_per_block >= count:
        return list(range(lo, lo + count))
    return [lo + (i + 1) * count // rows_per_block - 1 for i in range(rows_per_block)]


def sampled_block_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    block_size: int,
    q_blocks: Sequence[int],
    *,
    rows_per_block: int | None = None,
) -> torch.Tensor:
    """Exact attention mass per key block for the given query blocks.

    Args:
        query: ``(B, Hq, Lq, D)``; key ``(B, Hkv, Lk, D)`` (GQA when Hq > Hkv).
        attn_mask, is_causal, scale: as in SDPA (``is_causal`` is top-left).
        q_blocks: query block indices.
        rows_per_block: average over this many evenly spaced rows of each
            block (:func:`query_block_rows`) rather than all of them.

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
            rows = device_constant(tuple(query_block_rows(Lq, block_size, block, rows_per_block)), query.device, torch.int64)
            logits = (query[:, heads, rows].float() @ keys_t) * scale
            if is_causal:
                logits = logits.masked_fill(torch.arange(Lk, device=query.device) > rows[:, None], float("-inf"))
            elif attn_mask is not None:
                mask = attn_mask[:, mask_heads]
                mask = mask if mask.shape[-2] == 1 else mask[..., rows, :]
                logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
            probs = torch.softmax(logits, -1).nan_to_num(0.0)  # rows that see no key: all zero
            padded = torch.nn.functional.pad(probs, (0, n_k * block_size - Lk))
            out[:, heads, column] = padded.view(B, group, len(rows), n_k, block_size).sum((2, 4)) / len(rows)
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
    rows_per_block: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """:func:`sampled_block_mass`, in one Triton kernel where the call allows
    (``oracle_kernel``: calls without ``attn_mask``); other calls take
    :func:`sampled_block_mass`.

    Example:
        >>> q = k = torch.randn(1, 2, 512, 64)
        >>> exact_block_mass(q, k, None, True, None, 128, [2, 3], rows_per_block=16).sum(-1)
        tensor([[[1.0000, 1.0000],
                 [1.0000, 1.0000]]])
    """
    blocks = list(q_blocks)
    if attn_mask is not None or not uses_triton(backend, query):
        return sampled_block_mass(
            query, key, attn_mask, is_causal, scale, block_size, blocks, rows_per_block=rows_per_block
        )
    from .oracle_kernel import row_block_mass_triton

    rows = [query_block_rows(query.shape[2], block_size, block, rows_per_block) for block in blocks]
    positions = device_constant(tuple(sum(rows, [])), query.device, torch.int32)
    mass = row_block_mass_triton(query, key, positions, is_causal=is_causal, scale=scale, block_size=block_size)
    counts = [len(r) for r in rows]
    if len(set(counts)) == 1:  # one view, not a mean per block
        return mass.unflatten(2, (len(blocks), counts[0])).mean(3)
    return torch.stack([part.mean(2) for part in mass.split(counts, 2)], 2)


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
