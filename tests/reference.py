"""Plain-torch references the tests hold xflex to (float64, no FlexAttention)."""

from __future__ import annotations

import math

import torch


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    visible: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention in float64 with an element mask (True = attend) and an
    additive bias; GQA by repeating K/V heads; rows that see nothing give 0."""
    Hq, Hkv = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(Hq // Hkv, dim=1)
    v = v.double().repeat_interleave(Hq // Hkv, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (q.double() @ k.transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias.double()
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs @ v


def causal_visible(q_len: int, kv_len: int, offset: int = 0) -> torch.Tensor:
    """``kv <= q + offset`` as a ``(1, 1, Lq, Lk)`` bool tensor."""
    q = torch.arange(q_len)[:, None]
    kv = torch.arange(kv_len)[None, :]
    return (kv <= q + offset)[None, None]


def blocks_to_elements(blocks: torch.Tensor, q_len: int, kv_len: int, block_size: int) -> torch.Tensor:
    """Expand a ``(..., nQ, nK)`` block mask to ``(..., Lq, Lk)`` elements."""
    return blocks.repeat_interleave(block_size, -2)[..., :q_len, :].repeat_interleave(block_size, -1)[..., :kv_len]


# Per key offset r of an S x S tile, the query offset its product pairs with.
PAIRED_QUERY = {
    "antidiagonal": lambda r, S: S - 1 - r,
    "interleaved": lambda r, S: 2 * r if 2 * r < S else 2 * r - (S - 1),  # 0, 2, 4, ..., 1, 3, 5, ...
}


def antidiagonal_scores_naive(
    q, k, *, stride, block_size, scale=None, causal_offset=None, block_visible=None, pairing="antidiagonal", reduction="mean"
):
    """The XAttention block score by explicit loops over tiles (slow, obvious);
    a pair past either sequence's end has product 0, as a zero row gives.
    ``"mean+max"``: the two estimates stacked, the mean's first."""
    if reduction == "mean+max":
        kwargs = dict(stride=stride, block_size=block_size, scale=scale, causal_offset=causal_offset,
                      block_visible=block_visible, pairing=pairing)  # fmt: skip
        return torch.stack([antidiagonal_scores_naive(q, k, reduction=r, **kwargs) for r in ("mean", "max")])
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    S = stride
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    n_qt, n_kt = math.ceil(Lq / S), math.ceil(Lk / S)
    n_qb, n_kb = math.ceil(Lq / block_size), math.ceil(Lk / block_size)
    qd, kd = q.double(), k.double()
    out = torch.zeros(B, Hq, n_qb, n_kb, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            logits = torch.full((n_qt, n_kt), float("-inf"), dtype=torch.float64)
            for t in range(n_qt):
                for u in range(n_kt):
                    if causal_offset is not None and not u * S <= t * S + S - 1 + causal_offset:
                        continue
                    if block_visible is not None:
                        bv = block_visible[min(b, block_visible.shape[0] - 1), min(h, block_visible.shape[1] - 1)]
                        if not bv[t * S // block_size, u * S // block_size]:
                            continue
                    products = []
                    for r in range(S):
                        qi, ki = t * S + PAIRED_QUERY[pairing](r, S), u * S + r
                        products.append(float(qd[b, h, qi] @ kd[b, kh, ki]) if qi < Lq and ki < Lk else 0.0)
                    logits[t, u] = (sum(products) / S if reduction == "mean" else max(products)) * scale
            probs = torch.softmax(logits, -1).nan_to_num(0.0)
            for t in range(n_qt):
                for u in range(n_kt):
                    out[b, h, t * S // block_size, u * S // block_size] += probs[t, u]
    return out
