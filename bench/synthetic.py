"""LLM-like synthetic q/k/v for benchmarks: attention with the structure real
prefill attention has (sink, local band, a few heavy-hitter keys, smooth
content), so selection densities resemble real ones; plain randn gives
near-uniform attention, where any sparse method must keep everything."""

from __future__ import annotations

import torch

__all__ = ["llm_like_qkv"]


def llm_like_qkv(
    batch: int,
    heads: int,
    length: int,
    head_dim: int,
    *,
    kv_heads: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, H, L, D)`` q and ``(B, Hkv, L, D)`` k, v.

    Keys are smoothed noise over positions (nearby tokens look alike, so
    queries favour a local band); query t is built from key t plus noise; the
    first tokens and ~0.2% random tokens carry a shared "sink" direction every
    query aligns with (vertical lines). Per-head temperatures vary.
    """
    kv_heads = kv_heads or heads
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    # Smooth content: each key averages a window of random steps, so keys
    # within ~window tokens are correlated and queries favour a local band.
    window = 64
    steps = randn(batch * kv_heads, head_dim, length + window - 1)
    k = torch.nn.functional.avg_pool1d(steps, window, stride=1)
    k = k.view(batch, kv_heads, head_dim, length).transpose(-1, -2)
    k = k / k.std(dim=-1, keepdim=True).clamp_min(1e-6)
    sink = randn(1, kv_heads, 1, head_dim)
    sink = sink / sink.norm(dim=-1, keepdim=True) * head_dim**0.5
    heavy = torch.rand(batch, kv_heads, length, 1, generator=gen, device=device) < 0.002
    heavy[:, :, :4] = True
    k = k + 3.0 * heavy * sink
    group = heads // kv_heads
    temperature = torch.linspace(1.0, 2.5, heads, device=device).view(1, heads, 1, 1)
    q = k.repeat_interleave(group, dim=1) + 0.5 * randn(batch, heads, length, head_dim)
    q = (q + 0.5 * sink.repeat_interleave(group, dim=1)) * temperature
    v = randn(batch, kv_heads, length, head_dim)
    return q.to(dtype), k.to(dtype), v.to(dtype)
