"""Synthetic q/k/v for the GPU benchmarks (B=1 by default, bf16).

Two kinds:

- ``llm``: synthetic inputs with the structure that makes LLM attention
  sparse, on top of unit Gaussian noise: topics (every 256-token segment draws
  one of 16 topic directions shared by its queries and keys, +7.2 logits within
  a topic: content retrieval, block-sparse), attention sinks (the first 4 keys
  carry a direction every query leans toward, +10.6 logits), a local band (each
  query leans toward the mean of the 8 keys before it, +4.2 on each) and a
  per-head temperature (queries scaled by 0.7..2, log-uniform: flat to peaky
  heads). Density at tau 0.9 is about 0.13-0.16 at 4K-8K and falls with length;
- ``randn``: plain unit Gaussians (flat attention, the densest selection).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["INPUTS", "llm_like_inputs", "randn_inputs"]


def _randn(shape, gen, device):
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)


def llm_like_inputs(length, *, heads=32, kv_heads=32, head_dim=128, device="cuda", dtype=torch.bfloat16, seed=0):
    """``q (1, heads, L, D)``, ``k``/``v`` ``(1, kv_heads, L, D)``: topics, sinks,
    a local band and head temperatures over Gaussian noise (see the module
    docstring; logit bonuses are for D=128)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    group = heads // kv_heads
    q = _randn((1, heads, length, head_dim), gen, device)
    k = _randn((1, kv_heads, length, head_dim), gen, device)
    v = _randn((1, kv_heads, length, head_dim), gen, device)
    # Local band: q_i += 3 * mean(k_{i-8} .. k_{i-1}), from a running sum of keys.
    window = 8
    running = F.pad(k.cumsum(2), (0, 0, window + 1, 0))
    q += 3.0 * ((running[:, :, window:-1] - running[:, :, : -window - 1]) / window).repeat_interleave(group, 1)
    del running
    topics = F.normalize(_randn((16, head_dim), gen, device), dim=-1)
    segment_topic = torch.randint(0, 16, (math.ceil(length / 256),), generator=gen, device=device)
    topic = topics[segment_topic.repeat_interleave(256)[:length]]
    q += 9.0 * topic
    k += 9.0 * topic
    sink = F.normalize(_randn((1, kv_heads, 1, head_dim), gen, device), dim=-1)
    k[:, :, :4] += 20.0 * sink
    q += 6.0 * sink.repeat_interleave(group, 1)
    temperature = torch.empty((1, heads, 1, 1), device=device).uniform_(math.log(0.7), math.log(2.0), generator=gen)
    q *= temperature.exp()
    return q.to(dtype), k.to(dtype), v.to(dtype)


def randn_inputs(length, *, heads=32, kv_heads=32, head_dim=128, device="cuda", dtype=torch.bfloat16, seed=0):
    """Plain unit Gaussians of the same shapes as :func:`llm_like_inputs`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = _randn((1, heads, length, head_dim), gen, device)
    k = _randn((1, kv_heads, length, head_dim), gen, device)
    v = _randn((1, kv_heads, length, head_dim), gen, device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


INPUTS: dict[str, Callable] = {"llm": llm_like_inputs, "randn": randn_inputs}
