"""Stage 1, block scoring: XAttention's antidiagonal estimate of each
(query block, key block) pair's attention mass (Xu et al., "XAttention: Block
Sparse Attention with Antidiagonal Scoring", ICML 2025).

``reference`` is the plain-torch formula, ``triton_kernel`` the fused kernel,
``gluon_kernel`` the warp-specialised Hopper kernel; :func:`score_blocks`
picks one (the same result from each, up to summation order)."""

from __future__ import annotations

from typing import Literal

import torch

from ..backends import Backend, interpreting, uses_triton
from .fp8 import PRECISIONS, Precision, fp8_per_head, head_scales
from .reference import (
    PAIRINGS,
    REDUCTIONS,
    Pairing,
    Reduction,
    antidiagonal_block_scores,
    paired_query_rows,
    reduced_tile_visible,
    validate_reduction,
)

__all__ = [
    "PAIRINGS",
    "PRECISIONS",
    "REDUCTIONS",
    "Pairing",
    "Precision",
    "Reduction",
    "antidiagonal_block_scores",
    "paired_query_rows",
    "reduced_tile_visible",
    "score_blocks",
    "scoring_backend",
]

# "auto" takes the Gluon kernel from this many multiply-adds of the reduced GEMM
# (B*Hq*(Lq/S)*(Lk/S)*S*D, ~1 ms of scoring on an H200). Below it the call is
# launch-bound: the Gluon launch costs ~0.3 ms of host time against Triton's
# ~0.2 ms, more than its 8-10% of GPU time saves (bench/RESULTS.md, "Scoring
# cost").
_GLUON_MIN_MACS = 2**39


def _gluon_unsupported_reason(q: torch.Tensor, k: torch.Tensor, stride: int, block_visible) -> str | None:
    if not q.is_cuda or interpreting():
        return "it runs on CUDA tensors only"
    try:
        from . import gluon_kernel
    except ImportError as error:  # a Triton without Gluon
        return f"this Triton has no Gluon ({error})"
    return gluon_kernel.unsupported_reason(q, k, stride, block_visible)


def scoring_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    stride: int,
    block_visible: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> Literal["torch", "triton", "gluon"]:
    """The scorer :func:`score_blocks` runs for these inputs.

    ``"auto"`` takes the Gluon kernel where it runs (Hopper, fp16/bf16, no
    ``block_visible``; every reduction) and the call is large enough to pay
    for its costlier launch (~32K tokens and up), else Triton on CUDA, else
    torch. Raises ValueError when ``backend="gluon"`` cannot run them.

    Example:
        >>> q = torch.randn(1, 32, 65536, 128, device="cuda", dtype=torch.bfloat16)
        >>> scoring_backend(q, q, stride=8)  # on an H100 or H200
        'gluon'
    """
    if not uses_triton(backend, query):
        return "torch"
    if backend == "triton":
        return "triton"
    reason = _gluon_unsupported_reason(query, key, stride, block_visible)
    if reason is not None and backend == "gluon":
        raise ValueError(f"backend='gluon' cannot score these inputs: {reason}")
    B, Hq, Lq, D = query.shape
    macs = B * Hq * (Lq // stride) * (key.shape[2] // stride) * stride * D
    return "gluon" if reason is None and (backend == "gluon" or macs >= _GLUON_MIN_MACS) else "triton"


def score_blocks(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    stride: int,
    block_size: int,
    scale: float | None = None,
    causal_offset: int | None = None,
    block_visible: torch.Tensor | None = None,
    pairing: Pairing = "antidiagonal",
    reduction: Reduction = "mean",
    precision: Precision = "input",
    backend: Backend = "auto",
) -> torch.Tensor:
    """Antidiagonal block scores, on the scorer ``backend`` picks.

    Args:
        query: ``(B, Hq, Lq, D)``; key ``(B, Hkv, Lk, D)``, ``Hq`` a multiple of
            ``Hkv`` (GQA without copies).
        stride: antidiagonal length S, a divisor of ``block_size``.
        block_size: attention block size.
        scale: the attention's softmax scale (``1/sqrt(D)`` when None).
        causal_offset: None for no causal mask, else the diagonal offset
            (0: SDPA's top-left ``is_causal``; ``Lk - Lq``: bottom-right).
        block_visible: optional ``(B|1, Hq|1, nQ, nK)`` bool; key tiles of
            invisible blocks are left out of the softmax.
        pairing: which query row each key row of an ``S x S`` tile pairs with:
            ``"antidiagonal"`` (the paper's) or ``"interleaved"``
            (:func:`paired_query_rows`).
        reduction: how a tile's S paired products become its reduced logit:
            ``"mean"`` (the paper's) or ``"max"`` (``reference`` explains
            why), or ``"mean+max"``: both, from one pass over q and k.
        precision: ``"input"`` multiplies q and k as given; ``"fp8"``, where
            the Gluon scorer runs, rounds them to e4m3 with a power-of-two
            scale per head first (:func:`fp8.fp8_per_head`) and multiplies
            those (0.64-0.71x of its bf16 time with the rounding,
            bench/RESULTS.md, "FP8 scoring"). The other scorers have no fp8
            products and take the inputs as given: rounding would cost them
            time and save none.
        backend: see :func:`scoring_backend`.

    Returns:
        ``(B, Hq, nQ, nK)`` fp32; each query-block row sums to the number of
        its query tiles that see any key (``block_size / stride`` when whole).
        ``"mean+max"``: ``(2, B, Hq, nQ, nK)``, the mean's scores then the max's.

    Example:
        >>> q, k = torch.randn(1, 4, 300, 64), torch.randn(1, 2, 300, 64)
        >>> score_blocks(q, k, stride=8, block_size=128, causal_offset=0).shape
        torch.Size([1, 4, 3, 3])
    """
    kwargs = dict(
        stride=stride, block_size=block_size, scale=scale, causal_offset=causal_offset, block_visible=block_visible,
        pairing=pairing, reduction=reduction,
    )  # fmt: skip
    validate_reduction(reduction)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, but got precision={precision!r}")
    kernel = scoring_backend(query, key, stride=stride, block_visible=block_visible, backend=backend)
    if precision == "fp8" and kernel == "gluon":
        from .triton_kernel import antidiagonal_block_scores_triton

        (q8, q_inverse), (k8, k_inverse) = fp8_per_head(query), fp8_per_head(key)
        scales = head_scales(q_inverse, k_inverse)
        return antidiagonal_block_scores_triton(q8, k8, use_gluon=True, head_scale=scales, **kwargs)
    if kernel == "torch":
        return antidiagonal_block_scores(query, key, **kwargs)
    from .triton_kernel import antidiagonal_block_scores_triton

    return antidiagonal_block_scores_triton(query, key, use_gluon=kernel == "gluon", **kwargs)
