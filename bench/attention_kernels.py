"""What a computed block costs: FlexAttention's Triton and FLASH kernels on
BlockMasks built the way xflex builds them (random selections with the
diagonal, for causal calls the sink, partial and full blocks), against dense
SDPA on cuDNN over the same call. Efficiency = dense time x density / sparse
time (1.0: a computed block costs what cuDNN's dense blocks cost); the
break-even density of a kernel is its efficiency.

    python -m bench.attention_kernels --lengths 32768 131072 --densities 0.05 0.1 0.25 0.5
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from bench.common import best_dense_sdpa, time_ms
from xflex.attention import build_block_mask, call_pattern, forced_blocks, select_kv_blocks
from xflex.attention.flex import run_flex_attention
from xflex.attention.masks import visible_everywhere

_BLOCK = 128


def random_selection(q, k, causal: bool, density: float, seed: int = 0):
    """KVBlocks keeping about ``density`` of the visible blocks at random (per
    head), plus the diagonal and, when causal, the sink."""
    B, H, L, _ = q.shape
    pattern = call_pattern(q, k, None, causal, _BLOCK)
    n = math.ceil(L / _BLOCK)
    gen = torch.Generator(device=q.device).manual_seed(seed)
    scores = torch.rand(B, H, n, n, generator=gen, device=q.device)
    forced = forced_blocks(L, L, _BLOCK, diagonal_offset=0, keep_sink=causal, keep_recent=0, device=q.device)
    keep = (scores < density) | forced
    # Kept blocks score 1, the others 0: tau 1-eps keeps exactly the kept ones.
    blocks = select_kv_blocks(
        keep.float(),
        visible=pattern.visibility.any,
        fully_visible=pattern.visibility.all,
        forced=keep,
        threshold=torch.full((1, H, 1, 1), 0.5, device=q.device),
    )
    return pattern, blocks


def measure(length: int, heads: int, kv_heads: int, causal: bool, densities, kernels) -> list[str]:
    gen = torch.Generator(device="cuda").manual_seed(length)
    shape = lambda h: (1, h, length, 128)  # noqa: E731
    q = torch.randn(shape(heads), generator=gen, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(shape(kv_heads), generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dense_name, dense = best_dense_sdpa(q, k, v, causal=causal)
    dense_ms = time_ms(dense)
    lines = []
    for density in densities:
        pattern, blocks = random_selection(q, k, causal, density)
        actual = blocks.selected.sum().item() / pattern.visibility.any.expand_as(blocks.selected).sum().item()
        cells = []
        for kernel in kernels:
            mask_mod = pattern.mask_mod if pattern.mask_mod is not None or kernel == "triton" else visible_everywhere
            block_mask = build_block_mask(*blocks.kv_layout, mask_mod=mask_mod, block_size=_BLOCK, seq_lengths=(length, length))
            run = lambda: run_flex_attention(q, k, v, block_mask=block_mask, kernel=kernel)  # noqa: E731
            try:
                ms = time_ms(run)
            except Exception as error:  # a kernel that cannot run this case: say so in the table
                cells.append(f"{kernel}: {type(error).__name__}")
                continue
            cells.append(f"{kernel} {ms:.2f} ms, eff {dense_ms * actual / ms:.2f}")
        lines.append(
            f"| {length // 1024}K | {'causal' if causal else 'bidir'} | {heads}/{kv_heads} | {actual:.3f} | {dense_ms:.2f} ({dense_name}) | " + " | ".join(cells) + " |"
        )
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--kernels", nargs="+", default=["triton", "flash"])
    parser.add_argument("--layouts", nargs="+", default=["causal", "bidir"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.attention_kernels times GPU kernels: it needs CUDA")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; B=1, D=128, bf16, block {_BLOCK}", flush=True)
    print("| L | layout | Hq/Hkv | density | best dense ms | " + " | ".join(args.kernels) + " |", flush=True)
    for length in args.lengths:
        for layout in args.layouts:
            for kv_heads in args.kv_heads:
                measure(length, args.heads, kv_heads, layout == "causal", args.densities, args.kernels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
