"""diffusers' own Ulysses context parallelism under ``backend="xattn"``: a tiny
random Wan 2.1 transformer, ``enable_parallelism(ContextParallelConfig(
ulysses_degree=P))``, its default "native" attention backend, compiled with
xflex; prints what was rewritten, each rank's call shapes and density, and the
output against one process running the same compiled model unsharded.

    python -m bench.diffusers_ulysses [--world 2] [--threshold 0.5]

Runs P processes on the CPU over gloo (no GPU needed). diffusers builds its
mesh on ``torch.accelerator``'s device, and a CPU-only torch reports 0 devices
(``rank % 0`` fails), so this script tells diffusers there is one; with CUDA,
launch the same worker under NCCL instead. Findings (diffusers 0.42.1, torch
2.13 CPU) are in README "Several GPUs".
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import xflex

_OPTIONS = {"block_size": 32, "min_seq_len": 128, "dense_row_blocks": 0}


def _wan() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    import diffusers

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=1,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    gen = torch.Generator().manual_seed(1)
    # 4 latent frames of 16x16, 2x2 patches: 256 video tokens; 24 text tokens.
    inputs = dict(
        hidden_states=torch.randn(1, 4, 4, 16, 16, generator=gen),
        timestep=torch.tensor([999]),
        encoder_hidden_states=torch.randn(1, 24, 32, generator=gen),
    )
    return model, inputs


def _worker(rank: int, world: int, rendezvous: str, threshold: float) -> None:
    from diffusers import ContextParallelConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    model, inputs = _wan()
    settings = dict(threshold=threshold, method="threshold")
    with torch.no_grad(), xflex.sparsity(**settings):
        single = torch.compile(model, backend="xattn", options=_OPTIONS)(**inputs, return_dict=False)[0]
    torch._dynamo.reset()
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1  # see the module docstring
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    compiled = torch.compile(model, backend="xattn", options=_OPTIONS)
    with torch.no_grad(), xflex.sparsity(**settings) as stats:
        out = compiled(**inputs, return_dict=False)[0]
    totals = xflex.distributed.all_reduce_stats(stats)
    if rank == 0:
        for record in stats.records:
            what = record.dense_reason or f"density {record.head_density}"
            print(f"rank 0 call {record.name.rsplit('.', 1)[-1]}: q {record.query_shape} k {record.key_shape}: {what}")
        print(f"density over {world} ranks: {totals.density}")
        print(f"max |sharded - one process|: {(out - single).abs().max().item():.2e}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2, help="ranks (divides the 2 heads: 1 or 2)")
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rendezvous = os.path.join(folder, "rendezvous")
        mp.start_processes(_worker, args=(args.world, rendezvous, args.threshold), nprocs=args.world, start_method="spawn")


if __name__ == "__main__":
    main()
