"""Where the time of ``xflex.plan`` (scoring, probes, selection) goes on one
GPU: the CUDA kernels of one call by total time, their launch counts, and the
host time of the call, under ``torch.profiler``.

    python -m bench.tools.profile_plan --families llm video --lengths 32768 65536 --methods threshold adaptive
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import xflex
from xflex.benchmark.inputs import FAMILIES, make_inputs


def profile_plan(family: str, length: int, method: str, top: int) -> str:
    q, k, _ = make_inputs(family, length)
    causal = FAMILIES[family].causal
    config = xflex.Config(method=method)

    def call():
        return xflex.plan(q, k, is_causal=causal, config=config).blocks

    for _ in range(3):  # compile and autotune outside the profile
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    host_ms = (time.perf_counter() - start) * 1e3  # launches only: nothing synchronises
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total_us = sum(e.device_time_total for e in events)
    lines = [f"## {family} L={length} method={method}: {total_us / 1e3:.3f} ms on the GPU, {host_ms:.3f} ms to launch"]
    lines += [f"  {e.device_time_total / 1e3:8.3f} ms  x{e.count:<4d} {e.key[:110]}" for e in events[:top]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["llm"], choices=list(FAMILIES))
    parser.add_argument("--lengths", nargs="+", type=int, default=[32768])
    parser.add_argument("--methods", nargs="+", default=["threshold", "adaptive"])
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for family in args.families:
        for length in args.lengths:
            for method in args.methods:
                print(profile_plan(family, length, method, args.top), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
