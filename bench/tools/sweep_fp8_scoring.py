"""The Gluon scorer on fp8 inputs against bf16 inputs, by chunk config
(``gluon_kernel.FP8_CONFIG`` forced in turn), on one GPU.

Run ``python -m bench.tools.sweep_fp8_scoring`` on a Hopper GPU. Each row
times, with ``do_bench``, the rounding alone (``fp8.fp8_per_head`` of q and k),
the fp8 kernel alone on inputs rounded beforehand, and the whole fp8 estimate,
beside the bf16 kernel in the same run (LLM-like inputs, B=1, Hq=32, Hkv=8,
D=128, causal, block 128, interleaved pairing).
"""

from __future__ import annotations

import argparse

import torch

from bench.common import time_ms
from xflex.attention.scoring import gluon_kernel, score_blocks
from xflex.attention.scoring.fp8 import fp8_per_head, head_scales
from xflex.attention.scoring.triton_kernel import antidiagonal_block_scores_triton
from xflex.benchmark.inputs import make_inputs

_CONFIGS = (
    dict(BLOCK_K=128, Q_DEPTH=7, K_DEPTH=3),
    dict(BLOCK_K=64, Q_DEPTH=14, K_DEPTH=6),
    dict(BLOCK_K=64, Q_DEPTH=10, K_DEPTH=8),
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072])
    parser.add_argument("--strides", type=int, nargs="+", default=[8, 16])
    args = parser.parse_args(argv)
    shipped = dict(gluon_kernel.FP8_CONFIG)
    print("| L | S | bf16 kernel ms | rounding ms | fp8 config | fp8 kernel ms | fp8 estimate ms | estimate / bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        q, k, _ = make_inputs("llm", length, heads=32, kv_heads=8)
        (q8, q_inv), (k8, k_inv) = fp8_per_head(q), fp8_per_head(k)
        scales = head_scales(q_inv, k_inv)
        rounding_ms = time_ms(lambda: (fp8_per_head(q), fp8_per_head(k)))
        for stride in args.strides:
            kwargs = dict(stride=stride, block_size=128, causal_offset=0, pairing="interleaved")
            bf16_ms = time_ms(lambda: score_blocks(q, k, backend="gluon", **kwargs))
            for config in _CONFIGS:
                gluon_kernel.FP8_CONFIG.clear()
                gluon_kernel.FP8_CONFIG.update(config)
                kernel_ms = time_ms(lambda: antidiagonal_block_scores_triton(q8, k8, use_gluon=True, head_scale=scales, **kwargs))
                whole_ms = time_ms(lambda: score_blocks(q, k, precision="fp8", backend="gluon", **kwargs))
                name = " ".join(f"{key.lower()}={value}" for key, value in config.items())
                print(
                    f"| {length // 1024}K | {stride} | {bf16_ms:.2f} | {rounding_ms:.2f} | {name} | {kernel_ms:.2f} | "
                    f"{whole_ms:.2f} | {whole_ms / bf16_ms:.2f} |",
                    flush=True,
                )
        q = k = q8 = k8 = None  # freed before the next length
        torch.cuda.empty_cache()
    gluon_kernel.FP8_CONFIG.clear()
    gluon_kernel.FP8_CONFIG.update(shipped)


if __name__ == "__main__":
    main()
