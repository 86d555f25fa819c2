"""Sweep the Triton scorer's tile configs on one GPU: every candidate forced in
turn on LLM-like inputs (B=1, H=32, D=128, bf16, causal), its time beside
cuDNN dense attention and its largest score difference from the library's
autotuned choice. The library's configs are ``CONFIGS`` in
``xflex/attention/scoring/triton_kernel.py``; this is how they were picked.

    python -m bench.tools.tune_scoring --lengths 65536 131072 --strides 8 16
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.common import best_dense_sdpa, time_ms
from bench.scoring import describe, score
from xflex.benchmark.inputs import llm_like_inputs


def _candidates():
    import triton

    from xflex.attention.scoring.triton_kernel import CONFIGS

    def config(block_m, block_n, warps, stages, flatten=False):
        return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "FLATTEN": flatten}, num_warps=warps, num_stages=stages)

    extra = [config(128, 256, 8, 4), config(128, 256, 8, 2), config(64, 256, 4, 3), config(128, 128, 4, 3)]
    return list(CONFIGS) + extra


def sweep(length: int, stride: int) -> list[tuple[float, str, float]]:
    """``(ms, config, max |score - autotuned score|)`` per candidate, fastest first."""
    from xflex.attention.scoring.triton_kernel import scores_kernel as kernel

    q, k, _ = llm_like_inputs(length)
    configs = kernel.configs
    kernel.cache.clear()
    reference = score(q, k, stride)
    rows = []
    try:
        for candidate in _candidates():
            kernel.configs, kernel.cache = [candidate], {}
            try:
                diff = (score(q, k, stride) - reference).abs().max().item()
                rows.append((time_ms(lambda: score(q, k, stride)), describe(candidate), diff))
            except Exception as e:  # a tile that does not fit shared memory or registers
                rows.append((float("inf"), f"{describe(candidate)} ({type(e).__name__})", float("nan")))
    finally:
        kernel.configs, kernel.cache = configs, {}
    return sorted(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072])
    parser.add_argument("--strides", type=int, nargs="+", default=[8, 16])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.tune_scoring times GPU kernels: it needs CUDA")
    for length in args.lengths:
        q, k, v = llm_like_inputs(length)
        name, dense = best_dense_sdpa(q, k, v)
        dense_ms = time_ms(dense)
        del q, k, v
        print(f"L={length}: {name} {dense_ms:.2f} ms")
        for stride in args.strides:
            for ms, config, diff in sweep(length, stride):
                print(f"  S={stride} {config:20s} {ms:8.3f} ms {ms / dense_ms:6.2%} of dense  max diff {diff:.1e}", flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
