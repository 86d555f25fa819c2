"""Sparse attention under Ulysses context parallelism on 1, 2, 4 and 8 GPUs
of one host: per GPU count, the time per call of dense attention (the same
all-to-alls around dense SDPA) and of xflex, the speed-up, the density, the
peak memory per GPU, and the largest difference of xflex's output from the
one-GPU xflex op on the whole sequence.

One launch measures every GPU count up to the number of processes (the
ranks outside a subgroup wait). NVLink multicast stays off.

    python -m bench.ulysses_gpus --gpus 8 --family video --lengths 78643 307200 --heads 40 --kv-heads 40
    python -m bench.ulysses_gpus --gpus 8 --family llm --lengths 131072 1048576 --heads 32 --kv-heads 8
    python -m bench.ulysses_gpus --gpus 2 --device cpu --lengths 4096 --heads 4 --kv-heads 2   # CPU smoke run (gloo)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import xflex
from xflex.benchmark.inputs import FAMILIES, make_inputs
from xflex.distributed import all_reduce_stats, ulysses_attention

# The GPU machines' rule (KINDS.md): multicast can take a shared host's GPUs down.
_NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _synchronize(device: torch.device, group) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier(group=group)


def time_per_call_ms(fn, device: torch.device, group, reps: int) -> float:
    """Wall time per call over ``reps`` calls after one warm-up, every rank
    of ``group`` started together (the slowest rank decides)."""
    fn()
    _synchronize(device, group)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _synchronize(device, group)
    return (time.perf_counter() - start) * 1e3 / reps


def _peak_gib(device: torch.device, group) -> float:
    if device.type != "cuda":
        return float("nan")
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    return peak.item()


def measure(args, length: int, gpus: int, rank: int, device: torch.device) -> str | None:
    """One row (on rank 0 of the subgroup), or None on the ranks outside it."""
    group = dist.new_group(list(range(gpus)))  # every rank takes part in creating it
    if rank >= gpus:
        return None
    causal = FAMILIES[args.family].causal
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = make_inputs(args.family, length, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, device=device, dtype=dtype)
    bounds = [length * r // gpus for r in range(gpus + 1)]
    shard = slice(bounds[rank], bounds[rank + 1])
    local = [t[:, :, shard].contiguous() for t in (q, k, v)]
    gqa = args.heads != args.kv_heads
    config = xflex.Config(threshold=args.threshold, stride=args.stride)

    def attend():  # dense or sparse, as the active xflex.sparsity() says
        return ulysses_attention(*local, is_causal=causal, enable_gqa=gqa, group=group, config=config)

    with xflex.sparsity(enabled=False):
        dense_ms = time_per_call_ms(attend, device, group, args.reps)
    dense_peak = _peak_gib(device, group)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with xflex.sparsity() as stats:
        out = attend()
    density = all_reduce_stats(stats, group).density
    sparse_ms = time_per_call_ms(attend, device, group, args.reps)
    sparse_peak = _peak_gib(device, group)
    error = float("nan")
    if args.check:
        whole = xflex.sparse_sdpa(q, k, v, is_causal=causal, enable_gqa=gqa, config=config)[:, :, shard]
        diff = torch.tensor([(out.float() - whole.float()).abs().max().item()], device=device)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX, group=group)
        error = diff.item()
    dist.destroy_process_group(group)
    return (
        f"| {args.family} | {length / 1024:.4g}K | {gpus} | {dense_ms:.2f} | {sparse_ms:.2f} | {dense_ms / sparse_ms:.2f}x "
        f"| {'dense' if density is None else f'{density:.3f}'} | {dense_peak:.1f} / {sparse_peak:.1f} | {error:.2e} |"
    )


def _worker(rank: int, args) -> None:
    os.environ.update(_NO_MULTICAST)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=args.gpus, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=args.gpus)
    if rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (gloo)"
        print(f"# {args.gpus} x {name}, torch {torch.__version__}; B=1, Hq={args.heads}, Hkv={args.kv_heads}, "
              f"D={args.head_dim}, threshold {args.threshold}, S={args.stride}", flush=True)  # fmt: skip
        print("| family | L | GPUs | dense ms | xflex ms | speed-up | density | peak GiB per GPU, dense / xflex "
              "| max diff vs 1-GPU xflex |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)  # fmt: skip
    counts = [n for n in args.gpu_counts if n <= args.gpus]
    for length in args.lengths:
        for gpus in counts:
            try:
                row = measure(args, length, gpus, rank, device)
            except torch.OutOfMemoryError:
                row = f"| {args.family} | {length / 1024:.4g}K | {gpus} | out of memory |" if rank == 0 else None
            if row is not None and rank == 0:
                print(row, flush=True)
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count() or 1, help="processes (one GPU each)")
    parser.add_argument("--gpu-counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--family", default="video", choices=list(FAMILIES))
    parser.add_argument("--lengths", type=int, nargs="+", default=[78643])
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--kv-heads", type=int, default=40)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=xflex.Config().threshold)
    parser.add_argument("--stride", type=int, default=xflex.Config().stride)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the one-GPU reference (long lengths)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--port", type=int, default=29517)
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.gpus:
        sys.exit(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} CUDA devices")
    mp.spawn(_worker, args=(args,), nprocs=args.gpus, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
