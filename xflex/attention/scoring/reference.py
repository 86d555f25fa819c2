"""XAttention antidiagonal block scoring (Xu et al., "XAttention: Block Sparse
Attention with Antidiagonal Scoring", ICML 2025): the plain-torch reference.

Cut the attention matrix into ``S x S`` tiles; the sum of a tile's antidiagonal
(query offset ``S-1-r``, key offset ``r``) touches every row and column of the
tile once. With query rows reversed inside each tile, all antidiagonal sums are
one small matmul ``Qs @ Ks^T`` over stride-reshaped q and k. Softmax each reduced
row over its visible key tiles (fp32), then sum the probabilities inside each
``(Bs/S) x (Bs/S)`` group: that is the block score.

Any pairing of a tile's query and key offsets that is a permutation touches
each row and column once. The antidiagonal's query - key offsets,
``S-1-2r``, are all odd (S even): slash lines at even offsets, and the
diagonal q = k itself, cross no product of any tile. The ``"interleaved"``
pairing (query ``2r``, then ``2r-(S-1)``: the perfect shuffle) has offsets
``0..S/2-1`` and ``-(S/2-1)..0``: every residue mod S but S/2, each once per
S rows, where the antidiagonal has its odd ones twice (bench/RESULTS.md,
"The interleaved pairing").

A reduced logit is the tile's S paired products reduced one of two ways
(``Reduction``): their mean (the paper's; one matmul over the concatenated
rows), or their max; ``"mean+max"`` gives both from the same products. Attention's mass in a tile is the mean of the
products' exponentials, which the exponential of their mean underrates
by far where logits vary a lot from row to row (keys of large norm: needles,
hot keys; a sharp neighbourhood's peak): the max follows the mass there
(bench/RESULTS.md, "The max reduction").
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from einops import rearrange

__all__ = [
    "PAIRINGS",
    "Pairing",
    "REDUCTIONS",
    "Reduction",
    "antidiagonal_block_scores",
    "paired_query_rows",
    "reduced_tile_visible",
    "validate_scoring_inputs",
]

Pairing = Literal["antidiagonal", "interleaved"]
"""Which query row of an ``S x S`` tile each key row's product pairs with."""
PAIRINGS: tuple[str, ...] = get_args(Pairing)

Reduction = Literal["mean", "max", "mean+max"]
"""How a tile's S paired products become its reduced logit; ``"mean+max"``:
both estimates, stacked along a new leading dim (the mean's first)."""
REDUCTIONS: tuple[str, ...] = get_args(Reduction)


def paired_query_rows(stride: int, pairing: Pairing) -> list[int]:
    """Per key offset ``r`` of a tile, the query offset its product pairs with.

    Example:
        >>> paired_query_rows(8, "antidiagonal"), paired_query_rows(8, "interleaved")
        ([7, 6, 5, 4, 3, 2, 1, 0], [0, 2, 4, 6, 1, 3, 5, 7])
    """
    if pairing == "antidiagonal":
        return [stride - 1 - r for r in range(stride)]
    if pairing == "interleaved":
        return [2 * r if 2 * r < stride else 2 * r - (stride - 1) for r in range(stride)]
    raise ValueError(f"pairing must be one of {PAIRINGS}, but got pairing={pairing!r}")


def reduced_tile_visible(
    q_tiles: torch.Tensor, k_tiles: torch.Tensor, *, stride: int, causal_offset: int
) -> torch.Tensor:
    """Causal visibility of reduced tile ``(t, u)``: the tile's last query row sees
    its first key column (``u*S <= t*S + S - 1 + offset``). ``offset`` is 0 for
    SDPA's top-left ``is_causal`` and ``Lk - Lq`` for bottom-right (KV prefix)."""
    return k_tiles[None, :] * stride <= q_tiles[:, None] * stride + stride - 1 + causal_offset


def validate_reduction(reduction: object) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, but got reduction={reduction!r}")


def validate_scoring_inputs(q: torch.Tensor, k: torch.Tensor, stride: int, block_size: int) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (B, H, L, D), but got q.dim()={q.dim()} and k.dim()={k.dim()}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share batch and head dim, but got q{tuple(q.shape)} and k{tuple(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads must be a multiple of key heads, but got Hq={q.shape[1]} and Hkv={k.shape[1]}")
    if stride < 1 or block_size % stride:
        raise ValueError(f"stride must be a positive divisor of block_size, but got stride={stride} and block_size={block_size}")


def antidiagonal_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    stride: int,
    block_size: int,
    scale: float | None = None,
    causal_offset: int | None = None,
    block_visible: torch.Tensor | None = None,
    pairing: Pairing = "antidiagonal",
    reduction: Reduction = "mean",
    chunk_tokens: int = 16384,
) -> torch.Tensor:
    """Block importance scores from antidiagonal sums, in plain torch.

    Args:
        q: ``(B, Hq, Lq, D)`` queries.
        k: ``(B, Hkv, Lk, D)`` keys; ``Hq`` a multiple of ``Hkv`` (GQA, no copies).
        stride: antidiagonal length ``S``; must divide ``block_size``.
        block_size: attention block size ``Bs``.
        scale: softmax scale of the attention (``1/sqrt(D)`` when None),
            applied to the reduced logit.
        causal_offset: None for no causal mask, else the diagonal offset
            (0: top-left ``is_causal``; ``Lk - Lq``: bottom-right).
        block_visible: optional ``(B|1, Hq|1, nQ, nK)`` bool; key tiles in
            invisible blocks are left out of the softmax (padding, windows).
        pairing: which query row each key row of a tile pairs with
            (:func:`paired_query_rows`; the paper's antidiagonal by default).
        reduction: the reduced logit is the mean of the tile's S paired
            products (the paper's) or their max (``Reduction``); ``"mean+max"``
            returns both. Rows past the sequence are zero vectors: their
            products are 0 in either.
        chunk_tokens: queries scored at a time, bounding the reduced matrix.

    Returns:
        ``(B, Hq, ceil(Lq/Bs), ceil(Lk/Bs))`` fp32 scores; each query-block row
        sums to the number of its query tiles that see any key (``Bs/S`` for a
        full block), rows that see nothing are 0. ``"mean+max"``: ``(2, B,
        Hq, nQ, nK)``, the mean's scores then the max's.

    Example:
        >>> q, k = torch.randn(1, 4, 300, 64), torch.randn(1, 2, 300, 64)
        >>> antidiagonal_block_scores(q, k, stride=8, block_size=128, causal_offset=0).shape
        torch.Size([1, 4, 3, 3])
    """
    validate_scoring_inputs(q, k, stride, block_size)
    validate_reduction(reduction)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    S, tiles_per_block = stride, block_size // stride
    n_qt, n_kt = math.ceil(Lq / S), math.ceil(Lk / S)
    n_qb, n_kb = math.ceil(Lq / block_size), math.ceil(Lk / block_size)
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    # Zero rows pad the ragged last tile: they add nothing to a dot product.
    k_pad = torch.nn.functional.pad(k.float(), (0, 0, 0, n_kt * S - Lk))
    k_tiles = rearrange(k_pad, "b h (u s) d -> b h 1 s u d", s=S)
    q_pad = torch.nn.functional.pad(q.float(), (0, 0, 0, n_qt * S - Lq))
    q_tiles = rearrange(q_pad, "b (h g) (t s) d -> b h g t s d", s=S, h=Hkv)
    q_tiles = rearrange(q_tiles[..., paired_query_rows(S, pairing), :], "b h g t s d -> b h g s t d")
    estimates = reduction.split("+")
    # The mean of the products is one matmul over the concatenated rows (the
    # same with or without the max: "mean+max" repeats the mean's scores exactly).
    k_cat = rearrange(k_tiles, "b h 1 s u d -> b h 1 1 u (s d)")
    q_cat = rearrange(q_tiles, "b h g s t d -> b h g 1 t (s d)")

    u = torch.arange(n_kt, device=q.device)
    if block_visible is not None:
        tile_visible = block_visible.repeat_interleave(tiles_per_block, -1)[..., :n_kt]
        tile_visible = tile_visible.repeat_interleave(tiles_per_block, -2)[..., :n_qt, :]
        tile_visible = rearrange(tile_visible.expand(B, -1, -1, -1), "b (h g) t u -> b h g t u", h=1 if tile_visible.shape[1] == 1 else Hkv)

    shape = (len(estimates), B, Hkv, Hq // Hkv, n_qb * tiles_per_block, n_kb * tiles_per_block)
    scores = q.new_zeros(shape, dtype=torch.float32)
    # The max holds S products per reduced logit: S times fewer rows at a time.
    chunk_blocks = chunk_tokens // block_size // (1 if estimates == ["mean"] else S)
    chunk_tiles = max(1, chunk_blocks) * tiles_per_block
    for t0 in range(0, n_qt, chunk_tiles):
        t1 = min(n_qt, t0 + chunk_tiles)
        visible = torch.ones((t1 - t0, n_kt), dtype=torch.bool, device=q.device)
        if causal_offset is not None:
            t = torch.arange(t0, t1, device=q.device)
            visible = reduced_tile_visible(t, u, stride=S, causal_offset=causal_offset)
        if block_visible is not None:
            visible = visible & tile_visible[..., t0:t1, :]
        for i, estimate in enumerate(estimates):
            if estimate == "mean":
                logits = (q_cat[..., t0:t1, :] @ k_cat.transpose(-1, -2))[..., 0, :, :] * (scale / S)
            else:
                logits = (q_tiles[..., t0:t1, :] @ k_tiles.transpose(-1, -2)).amax(-3) * scale  # (b, h, g, t, u)
            logits = logits.masked_fill(~visible, float("-inf"))
            scores[i, ..., t0:t1, :n_kt] = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows that see nothing
    scores = rearrange(
        scores, "e b h g (i ti) (j tj) -> e b (h g) i j ti tj", ti=tiles_per_block, tj=tiles_per_block
    ).sum((-1, -2))
    return scores if len(estimates) > 1 else scores[0]
