"""Sparse attention over several GPUs on torch.distributed: Ulysses context
parallelism around the unchanged xflex op, and a ``SparsityStats`` density
summed over ranks.

Ulysses (DeepSpeed-Ulysses, Jacobs et al. 2023): every rank holds a sequence
shard of all heads; one all-to-all gives each rank the whole sequence for its
share of the heads, so the op scores, selects and attends exactly as on one
GPU; a second all-to-all returns the output to sequence shards. Ring attention
(PyTorch's ``context_parallel``) is not supported: a block selection needs
every key of a query row at once, and the xflex op refuses to run inside that
context (see ``torch_internals.sdpa_patched_by_context_parallel``).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from .attention import SdpaArgs
from .config import Config
from .context import effective_config, sparsity
from .op import sparse_sdpa
from .stats import SparsityStats

__all__ = ["BlockTotals", "all_reduce_stats", "ulysses_attention"]


def ulysses_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    group: dist.ProcessGroup | None = None,
    config: Config | None = None,
    name: str = "ulysses_attention",
) -> torch.Tensor:
    """``xflex.sparse_sdpa`` over a sequence sharded across the ranks of ``group``.

    Every rank passes its own shard of the sequence, in rank order, with all
    heads; the result is that shard of the output, equal to ``sparse_sdpa`` on
    the whole sequence (the same blocks are selected). Collectives: one small
    all-gather of the shapes, three all-to-alls in and one out; one host sync
    (the shard lengths become split sizes). Written for eager calls.

    Args:
        query: ``(B, Hq, Lq_rank, E)``; key ``(B, Hkv, Lk_rank, E)``; value
            ``(B, Hkv, Lk_rank, Ev)``. Shard lengths may differ between ranks;
            everything else must be the same on every rank, and ``Hq`` a
            multiple of the group size.
        attn_mask: None, or a mask over the WHOLE sequence (global ``Lq``,
            ``Lk``), the same on every rank, broadcastable to ``(B, Hq, Lq, Lk)``
            (e.g. a ``(B, 1, 1, Lk)`` key-padding mask); each rank takes its
            heads of it. Shard-local masks are rejected.
        is_causal, scale: as in SDPA; causal is over the whole sequence.
        enable_gqa: as in SDPA. When the group size does not divide ``Hkv``,
            key/value heads are replicated (``P / gcd(Hkv, P)`` times) before
            the exchange so that every rank receives the ones its query heads use.
        group: the process group (default: the world).
        config: defaults, as in ``sparse_sdpa``; ``xflex.sparsity()`` overrides
            them. Per-head thresholds are cut to each rank's heads.
        name: the call's name in ``SparsityStats`` records (one record per
            rank, for that rank's heads: see ``all_reduce_stats``).

    Returns:
        ``(B, Hq, Lq_rank, Ev)``. Differentiable: the all-to-alls send
        gradients back (the op's backward is sparse on CUDA, dense on the CPU).

    Raises:
        ValueError, on every rank alike: shapes that differ between ranks
        other than in length, heads not divisible by the group size, a mask
        that does not cover the whole sequence.

    Example:
        >>> # each of P ranks: q, k, v = full_q[:, :, rank * L // P:(rank + 1) * L // P], ...
        >>> out = xflex.distributed.ulysses_attention(q, k, v, is_causal=True)   # doctest: +SKIP
    """
    SdpaArgs(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa).validate_values()
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ulysses_attention needs torch.distributed initialised (torch.distributed.init_process_group)")
    for arg, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.dim() != 4:
            raise ValueError(f"{arg} must be 4-D (B, H, L_rank, E), but got {tensor.dim()}-D shape {tuple(tensor.shape)}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    shards = _gather_shapes(query, key, value, attn_mask, group)
    q_lengths, kv_lengths = _check_shards(shards, enable_gqa, world)

    heads_per_rank = query.shape[1] // world
    heads = slice(rank * heads_per_rank, (rank + 1) * heads_per_rank)
    local_threshold = _rank_threshold(config or Config(), name, heads, query.shape[1])
    # Replicated KV heads line up with the query heads: query head h uses KV
    # head h // (Hq / Hkv) before and h // (Hq / (Hkv * repeat)) after, and
    # Hkv * repeat = lcm(Hkv, P) is a multiple of P, so each rank's query heads
    # find theirs among its Hkv * repeat / P.
    repeat = world // math.gcd(key.shape[1], world)
    if repeat > 1:
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    q_heads = _AllToAll.apply(query, q_lengths, group, True)
    k_heads = _AllToAll.apply(key, kv_lengths, group, True)
    v_heads = _AllToAll.apply(value, kv_lengths, group, True)
    if attn_mask is not None and attn_mask.dim() >= 3 and attn_mask.shape[-3] == query.shape[1]:
        attn_mask = attn_mask[..., heads, :, :]

    # The op reads thresholds from the active settings, which hold one per
    # global head: the innermost sparsity() block gives it this rank's.
    settings = (
        sparsity(threshold=local_threshold, threshold_by_call={})
        if local_threshold is not None
        else contextlib.nullcontext()
    )
    with settings:
        out = sparse_sdpa(
            q_heads, k_heads, v_heads, attn_mask, 0.0, is_causal, scale, enable_gqa, config=config, name=name
        )
    return _AllToAll.apply(out, q_lengths, group, False)


class BlockTotals(NamedTuple):
    """Computed and visible key blocks over the sparse calls of every rank."""

    selected: int
    visible: int

    @property
    def density(self) -> float | None:
        """``selected / visible``, None when no call of any rank ran sparse."""
        return self.selected / self.visible if self.visible else None


def all_reduce_stats(stats: SparsityStats, group: dist.ProcessGroup | None = None) -> BlockTotals:
    """``stats``' computed and visible blocks summed over the ranks of ``group``
    with one all-reduce; every rank must call it.

    Under ``ulysses_attention`` each rank records its own heads, so the sum
    is the density of the whole call.

    Example:
        >>> with xflex.sparsity() as stats:                               # doctest: +SKIP
        ...     out = model(x)
        >>> xflex.distributed.all_reduce_stats(stats).density             # doctest: +SKIP
        0.31
    """
    if not isinstance(stats, SparsityStats):
        raise TypeError(f"stats must be a SparsityStats (from xflex.sparsity()), but got {type(stats).__name__}")
    totals = torch.tensor(stats.block_totals(), dtype=torch.int64, device=_collective_device(group))
    dist.all_reduce(totals, group=group)
    return BlockTotals(*totals.tolist())


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    # Gloo (also in "cpu:gloo,cuda:nccl") reduces CPU tensors; NCCL and the
    # other accelerator backends only device tensors.
    backend = str(dist.get_backend(group))
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


# Layout of one rank's row in the gathered shapes.
_Q, _K, _V, _MASK = slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 17)


def _gather_shapes(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    group: dist.ProcessGroup | None,
) -> list[list[int]]:
    """Every rank's q, k, v and mask shapes, in rank order: all ranks then check the same numbers and fail together
    instead of some hanging in an all-to-all."""
    # A mask as [dims, its last four sizes left-padded with 1], none as [-1, 1, 1, 1, 1].
    mask = [-1, 1, 1, 1, 1]
    if attn_mask is not None:
        mask = [attn_mask.dim(), *((1,) * 4 + tuple(attn_mask.shape))[-4:]]
    row = torch.tensor([*query.shape, *key.shape, *value.shape, *mask], dtype=torch.int64, device=query.device)
    # all_gather (list form): its tensor form is renamed across torch 2.11-2.13.
    gathered = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, row, group=group)
    return torch.stack(gathered).tolist()


def _check_shards(shards: list[list[int]], enable_gqa: bool, world: int) -> tuple[list[int], list[int]]:
    """The query and key shard lengths per rank, after checking that the
    shards form one valid SDPA call (ValueError naming the argument)."""
    first = shards[0]
    for rank, row in enumerate(shards):
        for arg, dims in (("query", _Q), ("key", _K), ("value", _V)):
            ours, theirs = row[dims], first[dims]
            if ours[:2] + ours[3:] != theirs[:2] + theirs[3:]:
                raise ValueError(
                    f"{arg} must have the same (B, H, ., E) on every rank (only the shard length may differ), "
                    f"but rank {rank} has shape {tuple(ours)} and rank 0 {tuple(theirs)}"
                )
        if row[_K][:3] != row[_V][:3] or row[_Q][0] != row[_K][0] or row[_Q][3] != row[_K][3]:
            raise ValueError(
                f"query (B, Hq, L, E), key (B, Hkv, L_kv, E) and value (B, Hkv, L_kv, Ev) do not fit together: "
                f"rank {rank} has {tuple(row[_Q])}, {tuple(row[_K])}, {tuple(row[_V])}"
            )
        if row[_MASK] != first[_MASK]:
            raise ValueError(
                f"attn_mask must be the same whole-sequence mask on every rank, but rank {rank} passes "
                f"{_mask_text(row)} and rank 0 {_mask_text(first)}"
            )
    B, Hq = first[_Q][:2]
    Hkv = first[_K][1]
    if Hq % world:
        raise ValueError(
            f"query heads must be divisible by the group size (Ulysses gives each rank Hq / P of them), "
            f"but got Hq={Hq} for P={world} ranks"
        )
    if Hq != Hkv and not (enable_gqa and Hkv > 0 and Hq % Hkv == 0):
        raise ValueError(
            f"query heads must equal key heads, or be a multiple of them with enable_gqa=True, "
            f"but got Hq={Hq}, Hkv={Hkv}, enable_gqa={enable_gqa}"
        )
    q_lengths = [row[_Q][2] for row in shards]
    kv_lengths = [row[_K][2] for row in shards]
    if first[_MASK][0] > 4:
        raise ValueError(f"attn_mask must have at most 4 dims (B, H, Lq, Lk), but got {first[_MASK][0]}")
    if first[_MASK][0] >= 0:
        whole = (B, Hq, sum(q_lengths), sum(kv_lengths))
        try:
            torch.broadcast_shapes(tuple(first[_MASK][1:]), whole)
        except RuntimeError:
            raise ValueError(
                f"attn_mask must cover the whole sequence: broadcastable to (B, Hq, Lq, Lk)={whole} summed over "
                f"the ranks, but got shape {tuple(first[_MASK][1:])} (a mask of this rank's shard is not accepted)"
            ) from None
    return q_lengths, kv_lengths


def _mask_text(row: list[int]) -> str:
    dims = row[_MASK][0]
    return "no mask" if dims < 0 else f"a {dims}-D mask of shape {tuple(row[_MASK][1:])} (left-padded to 4-D)"


def _rank_threshold(config: Config, name: str, heads: slice, num_heads: int) -> tuple[float, ...] | None:
    """This rank's share of the call's per-head threshold, None when the call
    has one threshold for all heads."""
    threshold = effective_config(config).threshold_for(name)
    if not isinstance(threshold, tuple):
        return None
    if len(threshold) != num_heads:
        raise ValueError(
            f"threshold of call {name!r} has one value per query head, but got {len(threshold)} values for {num_heads} heads"
        )
    return threshold[heads]


def _seq_to_heads(x: torch.Tensor, lengths: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """``(B, H, L_rank, D)`` sequence shards -> ``(B, H / P, sum(lengths), D)``:
    the whole sequence of this rank's heads."""
    world = len(lengths)
    B, H, L, D = x.shape
    # Chunk j (rank j's heads) first, so that split j of the flat buffer goes to rank j.
    send = x.reshape(B, world, H // world, L, D).transpose(0, 1).contiguous().view(-1)
    chunk = B * (H // world) * D
    received = x.new_empty(chunk * sum(lengths))
    dist.all_to_all_single(
        received,
        send,
        output_split_sizes=[chunk * length for length in lengths],
        input_split_sizes=[chunk * L] * world,
        group=group,
    )
    parts = received.split([chunk * length for length in lengths])
    return torch.cat([part.view(B, H // world, length, D) for part, length in zip(parts, lengths)], dim=2)


def _heads_to_seq(x: torch.Tensor, lengths: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """The inverse of :func:`_seq_to_heads`: ``(B, H / P, sum(lengths), D)`` ->
    ``(B, H, L_rank, D)``."""
    world, rank = len(lengths), dist.get_rank(group)
    B, H_rank, _, D = x.shape
    send = torch.cat([part.reshape(-1) for part in x.split(lengths, dim=2)])
    chunk = B * H_rank * D
    received = x.new_empty(world * chunk * lengths[rank])
    dist.all_to_all_single(
        received,
        send,
        output_split_sizes=[chunk * lengths[rank]] * world,
        input_split_sizes=[chunk * length for length in lengths],
        group=group,
    )
    return received.view(world, B, H_rank, lengths[rank], D).transpose(0, 1).reshape(B, world * H_rank, lengths[rank], D)


class _AllToAll(torch.autograd.Function):
    """:func:`_seq_to_heads` (``to_heads``) or :func:`_heads_to_seq`; the
    gradient of each is the other applied to the output's gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lengths: list[int], group: dist.ProcessGroup | None, to_heads: bool) -> torch.Tensor:
        ctx.lengths, ctx.group, ctx.to_heads = lengths, group, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, lengths, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inverse = _heads_to_seq if ctx.to_heads else _seq_to_heads
        return inverse(grad.contiguous(), ctx.lengths, ctx.group), None, None, None
