"""What a dense fallback costs: the xflex op on a call it runs as dense SDPA
(below the GPU's break-even length), against cuDNN SDPA and SDPA's own
default choice, timed in turns within one process so that the GPU's drift
between measurements falls on all three alike (``xflex bench`` times dense
first and the op after it: one 8K row read 0.90x there, bench/RESULTS.md,
"Video at density ~0.25, and the ends of the length range").

    python -m bench.tools.time_fallback --families llm video --lengths 8192 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

import xflex
from xflex.benchmark.inputs import FAMILIES, make_inputs
from xflex.benchmark.timing import dense_sdpa, time_ms


def time_fallback(family: str, length: int, *, rounds: int, heads: int = 32, kv_heads: int = 8) -> dict[str, list[float]]:
    """Per callable, ``rounds`` do_bench medians (ms), taken in turns.

    Example:
        >>> times = time_fallback("llm", 8192, rounds=3)   # doctest: +SKIP
    """
    from torch.nn.attention import SDPBackend

    causal = FAMILIES[family].causal
    q, k, v = make_inputs(family, length, heads=heads, kv_heads=kv_heads, head_dim=128)
    gqa = heads != kv_heads
    calls = {
        "cudnn": dense_sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION, causal=causal),
        "sdpa default": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa),
        "xflex": lambda: xflex.sparse_sdpa(q, k, v, is_causal=causal, enable_gqa=gqa, name=family),
    }
    with xflex.sparsity() as stats:
        calls["xflex"]()
    if stats.records[-1].sparse:
        raise SystemExit(f"{family} L={length} runs sparse here: pick a length below the break-even")
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(time_ms(fn, warmup=25, rep=100))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["llm"], choices=list(FAMILIES))
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("time_fallback needs CUDA", file=sys.stderr)
        return 1
    print("| family | L | call | median ms | min | max | xflex / cuDNN (medians) |\n|---|---:|---|---:|---:|---:|---:|")
    for family in args.families:
        for length in args.lengths:
            times = time_fallback(family, length, rounds=args.rounds)
            cudnn = statistics.median(times["cudnn"])
            for name, ts in times.items():
                ratio = f"{statistics.median(ts) / cudnn:.3f}" if name == "xflex" else ""
                print(f"| {family} | {length} | {name} | {statistics.median(ts):.3f} | {min(ts):.3f} | {max(ts):.3f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
