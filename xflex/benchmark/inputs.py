"""Input families for the benchmarks: q/k/v with the structures that make
attention sparse (or not). Planted structures add a logit bonus (in units of
the softmax's own logits, after the 1/sqrt(D) scale) on top of unit-Gaussian
noise, whose logits have a standard deviation of about 1; ``sharpness``
scales every bonus.

- ``llm``: topics (256-token segments share one of 16 directions, +7.2),
  attention sinks (+10.6 on the first 4 keys), a local band (+4.2 on each of
  the 8 keys before a query) and per-head temperatures 0.7-2x. Smooth and
  block-sparse; causal.
- ``spiky``: LLM heads with "vertical" and "slash" patterns: a sink (+10),
  per KV head one hot key per 1024 tokens at random positions (+7 to +9: the
  vertical lines), and two slash lines at head-specific offsets of either
  parity (query i leans to key i - d, +8). Causal.
- ``needle``: the ``llm`` structure plus hidden needles: per KV head, 4 spans
  of 64 queries that each share a direction (+10) with a 16-token key span far
  before them: long-range retrieval that block averages can hide. Causal.
- ``video``: bidirectional, tokens on a frames x height x width grid (frames
  of 16 x 16 tokens). Even heads are spatial (keys near the query in (t, y, x)),
  odd heads temporal (keys at the query's (y, x) in nearby frames), both as
  smooth kernels of the distance. ``diffuse`` is the same with wide, weak
  neighbourhoods: attention spread over most keys.
- ``randn``: plain unit Gaussians (flat attention, the densest selection); causal.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["FAMILIES", "Family", "llm_like_inputs", "make_inputs"]


def _randn(shape, gen, device):
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)


def _noise(length, heads, kv_heads, head_dim, gen, device, query_scale=1.0):
    q = query_scale * _randn((1, heads, length, head_dim), gen, device)
    k = _randn((1, kv_heads, length, head_dim), gen, device)
    v = _randn((1, kv_heads, length, head_dim), gen, device)
    return q, k, v


def _planted(direction: torch.Tensor, bonus) -> tuple[torch.Tensor, torch.Tensor]:
    """``(query part, key part)`` to add to query and key rows so that their
    logit q.k/sqrt(D) rises by ``bonus`` (a float, or a tensor: one per key row)."""
    root = direction.shape[-1] ** 0.25  # |query part| * |key part| = bonus * sqrt(D)
    bonus = torch.as_tensor(bonus, device=direction.device, dtype=direction.dtype)
    return root * direction, (bonus[..., None] if bonus.dim() else bonus) * root * direction


def llm_like_inputs(length, *, heads=32, kv_heads=32, head_dim=128, device="cuda", dtype=torch.bfloat16, seed=0, sharpness=1.0):
    """The ``llm`` family (bonuses as listed above for D=128)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    group = heads // kv_heads
    q, k, v = _noise(length, heads, kv_heads, head_dim, gen, device)
    # Local band: q_i += 3 * mean(k_{i-8} .. k_{i-1}), from a running sum of keys.
    window = 8
    running = F.pad(k.cumsum(2), (0, 0, window + 1, 0))
    q += 3.0 * sharpness * ((running[:, :, window:-1] - running[:, :, : -window - 1]) / window).repeat_interleave(group, 1)
    del running
    topics = F.normalize(_randn((16, head_dim), gen, device), dim=-1)
    segment_topic = torch.randint(0, 16, (math.ceil(length / 256),), generator=gen, device=device)
    topic = topics[segment_topic.repeat_interleave(256)[:length]]
    q += 9.0 * sharpness * topic
    k += 9.0 * topic
    sink = F.normalize(_randn((1, kv_heads, 1, head_dim), gen, device), dim=-1)
    k[:, :, :4] += 20.0 * sink
    q += 6.0 * sharpness * sink.repeat_interleave(group, 1)
    temperature = torch.empty((1, heads, 1, 1), device=device).uniform_(math.log(0.7), math.log(2.0), generator=gen)
    q *= temperature.exp()
    return q.to(dtype), k.to(dtype), v.to(dtype)


def spiky_inputs(length, *, heads=32, kv_heads=32, head_dim=128, device="cuda", dtype=torch.bfloat16, seed=0, sharpness=1.0):
    """The ``spiky`` family: a sink, hot vertical keys and two slash lines per KV head."""
    gen = torch.Generator(device=device).manual_seed(seed)
    group = heads // kv_heads
    # Noise logits of standard deviation 0.5, bonuses that grow with log(L):
    # the planted structure holds most of the mass at every length.
    q, k, v = _noise(length, heads, kv_heads, head_dim, gen, device, query_scale=0.5)
    sharpness = sharpness * (1.0 + math.log(length / 4096) / 10.0)
    for h in range(kv_heads):
        queries = slice(h * group, (h + 1) * group)
        n_hot = max(4, length // 4096)
        hot = torch.randint(1, length, (n_hot,), generator=gen, device=device)
        bonus = torch.empty(n_hot, device=device).uniform_(9.0, 11.0, generator=gen) * sharpness
        q_part, k_part = _planted(F.normalize(_randn((head_dim,), gen, device), dim=0), bonus)
        q[0, queries] += q_part
        k[0, h, hot] += k_part
        for d in torch.randint(64, max(65, length // 3), (2,), generator=gen, device=device).tolist():
            # q_i += c * k_{i-d} adds c * |k|^2 / sqrt(D) ~ c * sqrt(D) to that one logit.
            q[0, queries, d:] += 9.0 * sharpness / math.sqrt(head_dim) * k[0, h, None, :-d]
        q_part, k_part = _planted(F.normalize(_randn((head_dim,), gen, device), dim=0), 10.0 * sharpness)
        q[0, queries] += q_part
        k[0, h, :1] += k_part
    return q.to(dtype), k.to(dtype), v.to(dtype)


def needle_inputs(length, *, heads=32, kv_heads=32, head_dim=128, device="cuda", dtype=torch.bfloat16, seed=0, sharpness=1.0):
    """The ``needle`` family: ``llm`` plus, per KV head, 4 query spans of 64
    tokens that each retrieve a 16-token key span far before them (+10)."""
    q, k, v = (t.float() for t in llm_like_inputs(length, heads=heads, kv_heads=kv_heads, head_dim=head_dim, device=device, dtype=torch.float32, seed=seed, sharpness=sharpness))
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    group = heads // kv_heads
    for h in range(kv_heads):
        for _ in range(4):
            query_start = int(torch.randint(length // 2, length - 64, (1,), generator=gen, device=device))
            key_start = int(torch.randint(0, query_start // 2, (1,), generator=gen, device=device))
            q_part, k_part = _planted(F.normalize(_randn((head_dim,), gen, device), dim=0), 10.0 * sharpness)
            q[0, h * group : (h + 1) * group, query_start : query_start + 64] += q_part
            k[0, h, key_start : key_start + 16] += k_part
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _video_grid(length: int, frame_tokens: int = 256, width: int = 16) -> torch.Tensor:
    """``(L, 3)`` float (t, y, x) of each token, frames of ``frame_tokens`` tokens ``width`` wide."""
    index = torch.arange(length)
    frame, within = index // frame_tokens, index % frame_tokens
    return torch.stack([frame, within // width, within % width], -1).float()


def video_like_inputs(
    length, *, heads=32, kv_heads=32, head_dim=128, device="cuda", dtype=torch.bfloat16, seed=0, sharpness=1.0, reach=1.0
):
    """The ``video`` family (``reach`` widens every neighbourhood: ``diffuse``
    uses 4 with weaker bonuses). Logit of query a and key b: a smooth kernel of
    their distance on the grid, built from random Fourier features so that
    q.k/sqrt(D) = bonus * mean(cos(w . (p_a - p_b))) (+ noise): spatial heads
    use frequencies in (t, y, x), temporal heads in (y, x) only."""
    gen = torch.Generator(device=device).manual_seed(seed)
    group = heads // kv_heads
    grid = _video_grid(length).to(device)
    q = 0.3 * _randn((1, heads, length, head_dim), gen, device)
    k = 0.3 * _randn((1, kv_heads, length, head_dim), gen, device)
    v = _randn((1, kv_heads, length, head_dim), gen, device)
    bonus = 12.0 * sharpness
    for h in range(kv_heads):
        temporal = h % 2 == 1
        # Length scales in grid units: spatial heads ~2 tokens in y, x and ~1 frame in t;
        # temporal heads ~1 token in y, x and ~8 frames in t.
        scales = torch.tensor([8.0, 1.0, 1.0] if temporal else [1.0, 2.0, 2.0], device=device) * reach
        freqs = _randn((head_dim // 2, 3), gen, device) / scales
        phase = grid @ freqs.T  # (L, D/2)
        features = torch.cat([phase.cos(), phase.sin()], -1) * math.sqrt(bonus * math.sqrt(head_dim) / (head_dim // 2))
        k[0, h] += features
        q[0, h * group : (h + 1) * group] += features
    return q.to(dtype), k.to(dtype), v.to(dtype)


def randn_inputs(length, *, heads=32, kv_heads=32, head_dim=128, device="cuda", dtype=torch.bfloat16, seed=0, sharpness=1.0):
    """Plain unit Gaussians of the same shapes as the other families."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = _noise(length, heads, kv_heads, head_dim, gen, device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@dataclasses.dataclass(frozen=True)
class Family:
    """An input family: how to make it and how it is attended."""

    make: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    causal: bool
    options: dict = dataclasses.field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "llm": Family(llm_like_inputs, causal=True),
    "spiky": Family(spiky_inputs, causal=True),
    "needle": Family(needle_inputs, causal=True),
    "video": Family(video_like_inputs, causal=False),
    "diffuse": Family(video_like_inputs, causal=False, options=dict(reach=4.0, sharpness=0.5)),
    "randn": Family(randn_inputs, causal=True),
}


def make_inputs(family: str, length: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, k, v)`` of ``family`` (see ``FAMILIES``) at ``length`` tokens."""
    spec = FAMILIES[family]
    return spec.make(length, **{**spec.options, **kwargs})
