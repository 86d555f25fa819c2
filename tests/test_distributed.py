"""xflex.distributed on the CPU: torch.distributed over gloo, 2 and 4
processes spawned inside the test. Each rank holds a sequence shard; Ulysses
attention must give that shard of what one process computes from the whole
tensors (same block selection, checked against the float64 reference of the
selected blocks), dense SDPA at threshold 1.0, and every error on every rank.

Cost: FlexAttention compiles per shape on the CPU (~15 s each, cached on disk
under /tmp/torchinductor_*), so every sparse case uses one per-rank shape,
(1, 1, 512, 16) causal (Hq = P heads), and all cases of a world size
run in one spawned group. Plumbing-only cases (masks, GQA without replication,
gradients) run with sparsity disabled: the exchange is the same, nothing compiles.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from reference import attention_ref, blocks_to_elements, causal_visible

import xflex
from xflex.distributed import all_reduce_stats, ulysses_attention

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"),
]

L, D, BLOCK = 512, 16, 64
# A group that takes longer has hung in a collective (measured: < 60 s each on 2 busy cores, cold cache).
TIMEOUT_S = 240


def _config(**options) -> xflex.Config:
    return xflex.Config(block_size=BLOCK, min_seq_len=BLOCK, dense_row_blocks=0, **options)


def _shard_bounds(world: int, even: bool) -> list[tuple[int, int]]:
    """``[start, stop)`` of each rank's shard; uneven ones differ in length."""
    lengths = [L // world] * world if even else [192, 320] if world == 2 else [64, 128, 192, 128]
    starts = [sum(lengths[:r]) for r in range(world)]
    return [(s, s + n) for s, n in zip(starts, lengths)]


def _inputs(hq: int, hkv: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Key blocks shifted along a direction the queries share: block masses
    # differ by up to e^4, so the thresholds keep different numbers of blocks.
    shift = torch.rand(hkv, L // BLOCK, 1, generator=gen).mul(2).sub(1).repeat_interleave(BLOCK, 1)
    q = torch.randn(1, hq, L, D, generator=gen) + 1
    k = torch.randn(1, hkv, L, D, generator=gen) + shift
    return q, k, torch.randn(1, hkv, L, D, generator=gen)


def _sparse_case(rank, world, *, threshold, method, even, hkv=None, per_head=False):
    """One causal sparse call on the shards against the single-process reference
    (causal over the whole sequence: a rank attending its own shard would differ)."""
    hq = world
    hkv = hq if hkv is None else hkv
    q, k, v = _inputs(hq, hkv)
    start, stop = _shard_bounds(world, even)[rank]
    config = _config(method=method, threshold=threshold)
    full_threshold = tuple(threshold + 0.3 * (h % 2) for h in range(hq)) if per_head else threshold
    overrides = {"threshold": full_threshold} if per_head else {}
    with xflex.sparsity(**overrides) as stats:
        out = ulysses_attention(
            *(t[:, :, start:stop] for t in (q, k, v)), is_causal=True, enable_gqa=hq != hkv, config=config
        )
    assert stats.dense_calls == [], stats.dense_calls[0].dense_reason
    totals = all_reduce_stats(stats)

    full = xflex.plan(q, k, is_causal=True, config=_config(method=method, threshold=full_threshold))
    kept = blocks_to_elements(full.selected, L, L, BLOCK) & causal_visible(L, L)
    ref = attention_ref(q, k, v, visible=kept)[:, :, start:stop]
    label = f"P={world} rank {rank} tau={threshold} {method} even={even} hkv={hkv} per_head={per_head}"
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5, msg=lambda m: f"{label}: {m}")
    assert totals == (int(full.selected.sum()), int(full.visible.sum())), label
    if threshold == 1.0:
        assert totals.density == 1.0
        dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hkv)[:, :, start:stop]
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5, msg=lambda m: f"{label} vs SDPA: {m}")
    else:
        assert totals.density < 1.0, label


def _dense_plumbing_cases(rank, world):
    """Masks, GQA without replication and gradients, with sparsity disabled:
    the exchange alone against dense SDPA on the whole tensors."""
    start, stop = _shard_bounds(world, even=False)[rank]
    shard = lambda t: t[:, :, start:stop]  # noqa: E731

    q, k, v = _inputs(2 * world, world, seed=1)  # Hkv divisible by P: no replication, 2 query heads per KV head
    keys = torch.arange(L) < L - 100  # key padding at the end
    padding = keys[None, None, None, :]
    bias = torch.randn(1, 2 * world, L, L, generator=torch.Generator().manual_seed(2))  # a full mask with a head axis
    with xflex.sparsity(enabled=False):
        for mask in (None, padding, bias):
            out = ulysses_attention(shard(q), shard(k), shard(v), attn_mask=mask, enable_gqa=True)
            dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            torch.testing.assert_close(out, shard(dense), rtol=1e-5, atol=1e-5)

    # Gradients flow back through both all-to-alls (the CPU op runs dense with gradients).
    q, k, v = _inputs(world, 1, seed=3)  # one KV head, replicated to every rank
    local = [shard(t).clone().requires_grad_() for t in (q, k, v)]
    ulysses_attention(*local, is_causal=True, enable_gqa=True).square().sum().backward()
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*whole, is_causal=True, enable_gqa=True).square().sum().backward()
    for name, mine, theirs in zip("qkv", local, whole):
        torch.testing.assert_close(mine.grad, shard(theirs.grad), rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


def _error_cases(rank, world):
    """Each bad call raises the same ValueError on every rank (none hangs)."""
    q, k, v = _inputs(world, world)
    start, stop = _shard_bounds(world, even=True)[rank]
    q, k, v = (t[:, :, start:stop] for t in (q, k, v))
    odd = torch.randn(1, world + 1, stop - start, D)
    wide = torch.randn(1, world, stop - start, D + 1)
    cases = [
        ("divisible by the group size", dict(query=odd, key=odd, value=odd)),
        ("enable_gqa=True", dict(query=q, key=k[:, :1], value=v[:, :1])),
        ("whole sequence", dict(query=q, key=k, value=v, attn_mask=torch.ones(1, 1, 1, stop - start, dtype=torch.bool))),
        # Rank 0 alone passes a longer head dim: every rank learns it from the shapes it gathered.
        ("same \\(B, H, ., E\\) on every rank", dict(query=q, key=k, value=v) if rank else dict(query=wide, key=wide, value=wide)),
    ]
    for match, args in cases:
        with pytest.raises(ValueError, match=match):
            ulysses_attention(**args)


def _context_parallel_case(rank, world):
    """Inside PyTorch's context_parallel the op would see only this rank's shard: it raises."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    q, k, v = _inputs(world, world)
    with context_parallel(init_device_mesh("cpu", (world,)), buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
        with pytest.raises(RuntimeError, match="context_parallel"):
            xflex.sparse_sdpa(q, k, v, config=_config())


def _worker(rank: int, world: int, rendezvous: str) -> None:
    torch.set_num_threads(1)  # P processes share 2 cores
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        _error_cases(rank, world)
        _dense_plumbing_cases(rank, world)
        _sparse_case(rank, world, threshold=0.5, method="threshold", even=True)
        _sparse_case(rank, world, threshold=0.9, method="threshold", even=False)
        _sparse_case(rank, world, threshold=0.5, method="adaptive", even=False)
        _sparse_case(rank, world, threshold=0.9, method="adaptive", even=True)
        _sparse_case(rank, world, threshold=1.0, method="adaptive", even=False)
        _sparse_case(rank, world, threshold=0.5, method="threshold", even=True, hkv=1)
        _sparse_case(rank, world, threshold=0.5, method="adaptive", even=False, per_head=True)
        _context_parallel_case(rank, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_attention_matches_one_process(world, tmp_path):
    context = mp.start_processes(
        _worker, args=(world, str(tmp_path / "rendezvous")), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):  # raises if a rank failed
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish within {TIMEOUT_S} s (a collective hung?)")
