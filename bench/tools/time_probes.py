"""What the probe rows cost on one GPU, per scoring backend: the exact pass
over them (``xflex.attention.exact_block_mass``: the vertical lines' and the
adaptive method's ground truth) with all or some rows of each probe block,
beside the stride-1 block scorer that computed it before; the break-even
forecast (``xflex.planning.probe_density``: the threshold rule on a few probe
query blocks, read back to the host) and the adaptive method's calibration
(``xflex.planning.probe_calibration``), as wall time of the call with its
synchronisation, as a share of the best dense SDPA of the same run; and the
whole op on the Triton attention kernel (the break-even in force) against it.

    python -m bench.tools.time_probes --families llm video --lengths 32768 131072 --backends triton torch
    python -m bench.tools.time_probes --families llm video --lengths 32768 131072 --backends --rows-per-block 0 32 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

import xflex
from xflex.attention import call_pattern, exact_block_mass, score_blocks
from xflex.attention.selection.probes import probe_query_blocks
from xflex.benchmark.inputs import FAMILIES, make_inputs
from xflex.benchmark.timing import best_dense_sdpa, time_ms
from xflex.planning import probe_calibration, probe_density


def wall_ms(fn: Callable[[], object], reps: int = 10) -> float:
    """Median wall time of ``fn`` from a synchronised start to a synchronised end."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def stride_one_scorer(q: torch.Tensor, k: torch.Tensor, causal: bool, blocks: list[int], block_size: int) -> torch.Tensor:
    """The exact pass as it ran before ``oracle_kernel``: the Triton block
    scorer at stride 1 on every row of the probe blocks (the last ones when causal)."""
    rows = torch.cat([q[:, :, b * block_size : (b + 1) * block_size] for b in blocks], 2)
    start = blocks[0] * block_size
    sums = score_blocks(rows, k, stride=1, block_size=block_size, causal_offset=start if causal else None, backend="triton")
    return sums / block_size


def time_exact_pass(q: torch.Tensor, k: torch.Tensor, causal: bool, rows_per_block: list[int], dense_ms: float) -> list[str]:
    config = xflex.Config()
    blocks = probe_query_blocks(q.shape[2] // config.block_size, config.probe_blocks, causal=causal)
    before = time_ms(lambda: stride_one_scorer(q, k, causal, blocks, config.block_size))
    exact = exact_block_mass(q, k, None, causal, None, config.block_size, blocks)
    error = (stride_one_scorer(q, k, causal, blocks, config.block_size) - exact).abs().max().item()
    lines = [f"  exact pass, {len(blocks)} probe blocks: stride-1 scorer, every row {before:7.3f} ms "
             f"({100 * before / dense_ms:5.2f}% dense; max |diff| vs the kernel {error:.1e})"]  # fmt: skip
    for rows in rows_per_block:
        rows = rows or None  # 0: every row
        ms = time_ms(lambda: exact_block_mass(q, k, None, causal, None, config.block_size, blocks, rows_per_block=rows))
        lines.append(f"  exact pass, probe kernel, rows per block {rows or config.block_size:4d}: {ms:7.3f} ms "
                     f"({100 * ms / dense_ms:5.2f}% dense)")  # fmt: skip
    return lines


def time_family(
    family: str, length: int, backends: list[str], heads: int, kv_heads: int, rows_per_block: list[int]
) -> list[str]:
    q, k, v = make_inputs(family, length, heads=heads, kv_heads=kv_heads)
    causal = FAMILIES[family].causal
    dense_name, dense = best_dense_sdpa(q, k, v, causal=causal)
    dense_ms = time_ms(dense)
    lines = [f"## {family} L={length} Hq={heads} Hkv={kv_heads}: dense {dense_name} {dense_ms:.3f} ms"]
    if rows_per_block:
        lines += time_exact_pass(q, k, causal, rows_per_block, dense_ms)
    for backend in backends:
        config = xflex.Config(backend=backend)
        pattern = call_pattern(q, k, None, causal, config.block_size)
        target = config.threshold_tensor(heads, q.device)
        density = probe_density(q, k, pattern, config)
        forecast = wall_ms(lambda: probe_density(q, k, pattern, config))
        calibration = wall_ms(lambda: probe_calibration(q, k, None, causal, None, pattern, config, target)[1].sum().item())
        op_config = xflex.Config(backend=backend, attention_kernel="triton")
        op_ms = time_ms(lambda: xflex.sparse_sdpa(q, k, v, is_causal=causal, enable_gqa=heads != kv_heads, config=op_config))
        lines.append(
            f"  backend={backend:7s} forecast {forecast:7.3f} ms ({100 * forecast / dense_ms:5.2f}% dense, density {density:.3f})"
            f"  calibration {calibration:7.3f} ms ({100 * calibration / dense_ms:5.2f}%)"
            f"  op (Triton kernel) {op_ms:7.3f} ms ({dense_ms / op_ms:.2f}x dense)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["llm", "video"], choices=list(FAMILIES))
    parser.add_argument("--lengths", nargs="+", type=int, default=[32768])
    parser.add_argument("--backends", nargs="*", default=["triton", "torch"], choices=["triton", "torch"])
    parser.add_argument("--rows-per-block", nargs="*", type=int, default=[],
                        help="also time the exact pass with this many rows per probe block (0: every row)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for family in args.families:
        for length in args.lengths:
            print("\n".join(time_family(family, length, args.backends, args.heads, args.kv_heads, args.rows_per_block)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
