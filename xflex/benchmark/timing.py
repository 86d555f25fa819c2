"""Timing for GPU benchmarks: the median GPU time of a call, and dense SDPA
on one backend or the best one, as ``xflex bench`` and ``bench/`` measure
them in the same run."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["best_dense_sdpa", "dense_sdpa", "time_ms"]

# do_bench budgets (ms): a few runs per measurement at 128K keep the default runs short.
_WARMUP_MS, _REP_MS = 25, 100


def time_ms(fn: Callable[[], object], *, warmup: int = _WARMUP_MS, rep: int = _REP_MS) -> float:
    """Median GPU time of ``fn`` (triton.testing.do_bench, L2 flushed per run)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend, *, causal: bool = True) -> Callable[[], torch.Tensor]:
    """An SDPA call on one backend (``torch.nn.attention.SDPBackend``), GQA when the head counts differ."""
    from torch.nn.attention import sdpa_kernel

    def run() -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])

    return run


def best_dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True) -> tuple[str, Callable[[], torch.Tensor]]:
    """``(name, fn)``: SDPA on cuDNN, else FlashAttention, whichever runs first."""
    from torch.nn.attention import SDPBackend

    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        run = dense_sdpa(q, k, v, backend, causal=causal)
        try:
            run()
        except RuntimeError:
            continue
        return name, run
    raise RuntimeError("neither cuDNN nor FlashAttention SDPA runs on this GPU/torch")
