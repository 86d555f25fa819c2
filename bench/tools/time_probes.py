"""What the probe rows cost on one GPU, per scoring backend: the break-even
forecast (``xflex.planning.probe_density``: the threshold rule on a few probe
query blocks, read back to the host) and the adaptive method's calibration
(``xflex.planning.probe_calibration``), as wall time of the call with its
synchronisation, as a share of the best dense SDPA of the same run; and the
whole op on the Triton attention kernel (the break-even in force) against it.

    python -m bench.tools.time_probes --families llm video --lengths 32768 131072 --backends triton torch
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

import xflex
from xflex.attention import call_pattern
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


def time_family(family: str, length: int, backends: list[str], heads: int, kv_heads: int) -> list[str]:
    q, k, v = make_inputs(family, length, heads=heads, kv_heads=kv_heads)
    causal = FAMILIES[family].causal
    dense_name, dense = best_dense_sdpa(q, k, v, causal=causal)
    dense_ms = time_ms(dense)
    lines = [f"## {family} L={length} Hq={heads} Hkv={kv_heads}: dense {dense_name} {dense_ms:.3f} ms"]
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
    parser.add_argument("--backends", nargs="+", default=["triton", "torch"], choices=["triton", "torch"])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for family in args.families:
        for length in args.lengths:
            print("\n".join(time_family(family, length, args.backends, args.heads, args.kv_heads)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
