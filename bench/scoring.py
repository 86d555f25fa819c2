"""XAttention's block estimate (Xu et al., "XAttention: Block Sparse Attention
with Antidiagonal Scoring", ICML 2025): fused Triton scoring plus threshold
selection, timed against dense cuDNN attention on one GPU.

Run ``python -m bench.scoring`` on a CUDA machine; ``--quick`` for 8K/16K only, ``--long`` to add 256K, ``--out FILE`` to
save the table as markdown, ``--precision fp8`` for the e4m3 estimate,
``--reduction max`` or ``mean+max`` for the other estimates. The
GPU scores are checked against the plain-torch reference (of the e4m3-rounded
inputs for fp8) at 8K before anything is timed.

Inputs (B=1, H=32, D=128, bf16, causal): the families of xflex/benchmark/inputs.py.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

import xflex
from bench.common import best_dense_sdpa, peak_extra_mib, time_ms
from xflex.benchmark.inputs import FAMILIES, make_inputs
from xflex.attention import call_pattern, score_blocks, scoring_backend
from xflex.attention.scoring import REDUCTIONS
from xflex.attention.scoring.fp8 import dequantize, fp8_per_head
from xflex.planning import call_selection

_K = 1024
_LENGTHS = (8 * _K, 16 * _K, 32 * _K, 64 * _K, 128 * _K)
_QUICK_LENGTHS = (8 * _K, 16 * _K)
_LONG_LENGTHS = (256 * _K,)
_STRIDES = (8, 16)
_BLOCK_SIZE = 128
_THRESHOLD = 0.9
_REFERENCE_MAX_LEN = 32 * _K  # the plain-torch scorer is timed up to here
_CHECK_LEN = 8 * _K


def score(q, k, stride, backend="auto", precision="input", reduction="mean"):
    """The scorer ``backend`` picks, on a causal call."""
    return score_blocks(
        q, k, stride=stride, block_size=_BLOCK_SIZE, causal_offset=0, precision=precision, reduction=reduction,
        backend=backend,
    )  # fmt: skip


def reference_score(q, k, stride, precision="input", backend="auto", reduction="mean"):
    """The plain-torch scores; for fp8 on the Gluon scorer (the one that
    multiplies fp8), of the e4m3-rounded inputs (exact in fp32)."""
    if precision == "fp8" and scoring_backend(q, k, stride=stride, backend=backend) == "gluon":
        q, k = (dequantize(*fp8_per_head(x), torch.float32) for x in (q, k))
    return score(q, k, stride, backend="torch", reduction=reduction)


def select(scores, q, k, backend="auto", threshold=_THRESHOLD):
    """``(KVBlocks, visible)``: what the op does after scoring on a causal
    call (``backend="torch"``: the reference); ``visible`` is the causal
    block visibility. Two estimates (``"mean+max"``): the max's cut joins the
    mean's selection, as ``xflex.plan`` does."""
    pattern = call_pattern(q, k, None, True, _BLOCK_SIZE)
    config = xflex.Config(threshold=threshold, block_size=_BLOCK_SIZE, backend=backend)
    lines = None
    if scores.dim() == 5:
        lines = call_selection(scores[1], pattern, q.shape[2], k.shape[2], config).selected
        scores = scores[0]
    blocks = call_selection(scores, pattern, q.shape[2], k.shape[2], config, lines=lines)
    return blocks, pattern.visibility.any


def check_against_reference(kinds, heads, kv_heads, backend="auto", precision="input", reduction="mean") -> None:
    """GPU scores equal the reference on the same inputs (only summation
    order differs, and for fp8 the MMAs' reduced-precision accumulation, as
    in tests/test_scoring_gluon.py); raises before any timing otherwise."""
    # fp8: a bug moves scores by O(1); the accumulation by up to ~1e-2 (rows sum to 8-16).
    tolerance = dict(rtol=5e-2, atol=5e-2) if precision == "fp8" else dict(rtol=1e-4, atol=1e-5)
    for kind in kinds:
        q, k, _ = make_inputs(kind, _CHECK_LEN, heads=heads, kv_heads=kv_heads)
        for stride in _STRIDES:
            got = score(q, k, stride, backend, precision, reduction)
            want = reference_score(q, k, stride, precision, backend, reduction)
            diff = (got - want).abs()
            print(f"check {kind} L={_CHECK_LEN} S={stride}: max diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}")
            torch.testing.assert_close(got, want, **tolerance)


def _tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def describe(config) -> str:
    """A scorer config in a table cell, e.g. ``128x256 w8 s3 flat``."""
    flat = " flat" if config.kwargs["FLATTEN"] else ""
    return f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']} w{config.num_warps} s{config.num_stages}{flat}"


def _kernel_config(q, k, stride, backend, precision) -> str:
    """The scorer that ran, as a table cell: the Gluon kernel's config, or the
    Triton autotuner's pick."""
    from xflex.attention.scoring import triton_kernel

    if scoring_backend(q, k, stride=stride, backend=backend) == "gluon":
        from xflex.attention.scoring.gluon_kernel import KEY_RANGE, kernel_config

        dtype = torch.float8_e4m3fn if precision == "fp8" else q.dtype
        settings = kernel_config(dtype, q.shape[-1]) | {"KEY_RANGE": KEY_RANGE}
        name = "gluon" if precision == "input" else f"gluon {precision}"
        return name + " " + " ".join(f"{key.lower()}={value}" for key, value in settings.items())
    return describe(triton_kernel.scores_kernel.best_config) + ("" if precision == "input" else f" {precision}")


def run_case(length, kinds, heads, kv_heads, head_dim=128, backend="auto", precision="input", reduction="mean"):
    """Table rows for one length: one per (stride, input kind)."""
    from xflex.attention.scoring import triton_kernel

    # The autotuner's key leaves out the length: tune afresh so each row shows its best config.
    triton_kernel.scores_kernel.cache.clear()
    rows, dense_ms = [], None
    causal_pairs = length * (length + 1) / 2
    for kind in kinds:
        q, k, v = make_inputs(kind, length, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
        if dense_ms is None:  # the dense time does not depend on the values
            dense_name, dense = best_dense_sdpa(q, k, v)
            dense_ms = time_ms(dense)
            dense_tflops = _tflops(4 * heads * causal_pairs * head_dim, dense_ms)
        for stride in _STRIDES:
            scores = score(q, k, stride, backend, precision, reduction)  # compiles and autotunes outside the timing
            score_ms = time_ms(lambda: score(q, k, stride, backend, precision, reduction))
            reduced_pairs = math.ceil(length / stride) * (math.ceil(length / stride) + 1) / 2
            score_tflops = _tflops(2 * heads * reduced_pairs * stride * head_dim, score_ms)
            select_ms = time_ms(lambda: select(scores, q, k))
            torch_select_ms = time_ms(lambda: select(scores, q, k, backend="torch"))
            blocks, visible = select(scores, q, k)
            reference_blocks, _ = select(scores, q, k, backend="torch")
            differing = (blocks.selected != reference_blocks.selected).sum().item()
            density = blocks.selected.sum().item() / (visible.sum().item() * heads)
            ref_ms = None
            if length <= _REFERENCE_MAX_LEN:
                ref_ms = time_ms(lambda: reference_score(q, k, stride, precision, backend, reduction))
            scores = blocks = reference_blocks = None  # freed for the memory probe (lambdas above use them)
            mib = peak_extra_mib(lambda: select(score(q, k, stride, backend, precision, reduction), q, k))
            rows.append(
                dict(
                    L=f"{length // _K}K",
                    S=stride,
                    inputs=kind,
                    dense=f"{dense_ms:.2f} ({dense_name}, {dense_tflops:.0f} TF/s)",
                    score=f"{score_ms:.2f} ({score_tflops:.0f} TF/s)",
                    select=f"{select_ms:.3f}",
                    torch_select=f"{torch_select_ms:.2f}",
                    differing=str(differing),
                    ratio=f"{(score_ms + select_ms) / dense_ms:.1%}",
                    density=f"{density:.2f}",
                    reference="-" if ref_ms is None else f"{ref_ms:.2f}",
                    memory=f"{mib:.0f}",
                    config=_kernel_config(q, k, stride, backend, precision),
                )
            )
            print(" | ".join(str(x) for x in rows[-1].values()), flush=True)
        q = k = v = None
        torch.cuda.empty_cache()
    return rows


_HEADER = {
    "L": "L",
    "S": "S",
    "inputs": "inputs",
    "dense": "dense SDPA ms",
    "score": "score ms",
    "select": "select ms",
    "torch_select": "torch select ms",
    "differing": "blocks unlike torch select",
    "ratio": "(score+select)/dense",
    "density": f"density @ tau {_THRESHOLD}",
    "reference": "torch score ms",
    "memory": "peak extra MiB",
    "config": "kernel config",
}


def markdown_table(rows) -> str:
    lines = ["| " + " | ".join(_HEADER.values()) + " |", "|" + "---|" * len(_HEADER)]
    lines += ["| " + " | ".join(str(row[key]) for key in _HEADER) + " |" for row in rows]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time XAttention's Triton scoring + selection against dense cuDNN SDPA "
        f"(B=1, D=128, bf16, causal, block {_BLOCK_SIZE}, tau {_THRESHOLD})."
    )
    parser.add_argument("--quick", action="store_true", help="8K and 16K only")
    parser.add_argument("--min-length", type=int, default=0, help="leave out shorter lengths")
    parser.add_argument("--precision", choices=["input", "fp8"], default="input", help="what the estimate multiplies")
    parser.add_argument("--long", action="store_true", help="add 256K")
    parser.add_argument("--reduction", choices=list(REDUCTIONS), default="mean", help="the estimate(s) scored (default mean)")
    parser.add_argument("--out", metavar="FILE", help="also write the table as markdown to FILE")
    parser.add_argument("--inputs", choices=[*FAMILIES, "all"], default="llm", help="input family (default: llm)")
    parser.add_argument("--heads", type=int, default=32, help="query heads (default 32)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    parser.add_argument(
        "--backend", choices=["auto", "triton", "gluon"], default="auto", help="scorer (default auto: Gluon on Hopper)"
    )
    args = parser.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    if args.heads % args.kv_heads:
        parser.error(f"--heads must be a multiple of --kv-heads, but got {args.heads} and {args.kv_heads}")
    lengths = (_QUICK_LENGTHS if args.quick else _LENGTHS) + (_LONG_LENGTHS if args.long else ())
    args.lengths = [n for n in lengths if n >= args.min_length]
    args.kinds = list(FAMILIES) if args.inputs == "all" else [args.inputs]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.scoring times GPU kernels: it needs CUDA")
    import triton

    title = (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
        f"B=1, Hq={args.heads}, Hkv={args.kv_heads}, D=128, bf16, causal, block {_BLOCK_SIZE}, tau {_THRESHOLD}, "
        f"backend {args.backend}, precision {args.precision}, reduction {args.reduction}"
    )
    print(title)
    check_against_reference(args.kinds, args.heads, args.kv_heads, args.backend, args.precision, args.reduction)
    print(" | ".join(_HEADER.values()))
    rows = []
    for length in args.lengths:
        rows += run_case(
            length, args.kinds, args.heads, args.kv_heads, backend=args.backend, precision=args.precision,
            reduction=args.reduction,
        )  # fmt: skip
    table = markdown_table(rows)
    print()
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{title}\n\n{table}\n")


if __name__ == "__main__":
    main()
