"""End-to-end xflex attention vs the best dense SDPA, on one GPU, in one run.

For B=1, H=32, D=128, bf16, causal and L in 8K..128K: cuDNN and flash SDPA
times, then xflex (scoring + selection + BlockMask + FlexAttention) at
threshold 0.9 for strides 8 and 16, with the time split into its stages
(building the BlockMask launches no GPU work: it is not a column) and
the density, on LLM-like synthetic inputs (xflex/benchmark/inputs.py). Correctness is
checked before timing (threshold 1.0 against cuDNN at the smallest length).

    python -m bench.end_to_end [--lengths 8192 32768] [--out table.md]
"""

from __future__ import annotations

import argparse
import sys

import torch

import xflex
from bench.common import dense_sdpa, time_ms
from xflex.benchmark.inputs import llm_like_inputs
from xflex.attention import call_pattern, run_flex_attention
from xflex.planning import call_scores, call_selection


def check_correctness(length: int) -> float:
    from torch.nn.attention import SDPBackend

    q, k, v = llm_like_inputs(length, seed=1)
    out = xflex.sparse_sdpa(q, k, v, is_causal=True, config=xflex.Config(threshold=1.0))
    ref = dense_sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION)()
    err = (out.float() - ref.float()).abs().max().item()
    assert err < 2e-2, f"xflex at threshold 1.0 differs from cuDNN by {err}"
    return err


def bench_length(length: int, strides: list[int], threshold: float, heads: int, kv_heads: int) -> list[dict]:
    from torch.nn.attention import SDPBackend

    q, k, v = llm_like_inputs(length, heads=heads, kv_heads=kv_heads)
    rows = []
    t_cudnn = time_ms(dense_sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION))
    t_flash = time_ms(dense_sdpa(q, k, v, SDPBackend.FLASH_ATTENTION))
    best = min(t_cudnn, t_flash)
    for stride in strides:
        config = xflex.Config(threshold=threshold, stride=stride)
        with xflex.sparsity() as stats:
            xflex.sparse_sdpa(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1], config=config)
        pattern = call_pattern(q, k, None, True, config.block_size)
        t_score = time_ms(lambda: call_scores(q, k, pattern, config))
        scores = call_scores(q, k, pattern, config)
        t_select = time_ms(lambda: call_selection(scores, pattern, length, length, config))
        block_mask = xflex.plan(q, k, is_causal=True, config=config).block_mask
        t_flex = time_ms(lambda: run_flex_attention(q, k, v, block_mask=block_mask))
        t_total = time_ms(lambda: xflex.sparse_sdpa(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1], config=config))
        rows.append(
            dict(
                L=length,
                S=stride,
                cudnn=t_cudnn,
                flash=t_flash,
                xflex=t_total,
                speedup=best / t_total,
                density=stats.density,
                score=t_score,
                select=t_select,
                flex=t_flex,
            )
        )
        print(_row(rows[-1]), flush=True)
    return rows


HEADER = (
    "| L | S | cuDNN ms | flash ms | xflex ms | speedup vs best dense | density | score ms (% dense) "
    "| select ms | flex ms |\n|---|---|---|---|---|---|---|---|---|---|"
)


def _row(r: dict) -> str:
    best = min(r["cudnn"], r["flash"])
    return (
        f"| {r['L'] // 1024}K | {r['S']} | {r['cudnn']:.2f} | {r['flash']:.2f} | {r['xflex']:.2f} | {r['speedup']:.2f}x "
        f"| {r['density']:.3f} | {r['score']:.2f} ({100 * r['score'] / best:.1f}%) | {r['select']:.3f} "
        f"| {r['flex']:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--strides", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/end_to_end.py needs a CUDA GPU")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    print(f"correctness at threshold 1.0 vs cuDNN: max abs err {check_correctness(min(args.lengths)):.2e}", flush=True)
    print(HEADER, flush=True)
    rows = [r for L in args.lengths for r in bench_length(L, args.strides, args.threshold, args.heads, args.kv_heads)]
    if args.out:
        with open(args.out, "w") as f:
            f.write(HEADER + "\n" + "\n".join(_row(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
