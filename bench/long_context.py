"""256K tokens on one GPU: peak extra memory of scoring, selection and the
whole xflex op, the BlockMask's own size, and time against cuDNN dense
(B=1, H=32, D=128, bf16, causal, tau 0.9, LLM-like inputs).

    python -m bench.long_context [--length 262144]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import xflex
from bench.common import peak_extra_mib, time_ms
from xflex.benchmark.inputs import llm_like_inputs
from xflex.attention import call_pattern
from xflex.planning import call_scores

_BLOCK_SIZE = 128


def time_once_ms(fn) -> float:
    """One timed run after one warm-up (a 256K call takes 0.1-1 s)."""
    return time_ms(fn, warmup=1, rep=1)


def measure(q, k, v, stride: int) -> str:
    length = q.shape[2]
    config = xflex.Config(threshold=0.9, stride=stride, block_size=_BLOCK_SIZE)
    pattern = call_pattern(q, k, None, True, _BLOCK_SIZE)
    baseline = torch.cuda.memory_allocated()
    xflex.plan(q, k, is_causal=True, config=config)  # autotune first: its timing allocates a 256 MB L2-flush buffer
    scoring = peak_extra_mib(lambda: call_scores(q, k, pattern, config), baseline)
    planning = peak_extra_mib(lambda: xflex.plan(q, k, is_causal=True, config=config), baseline)
    mask = xflex.plan(q, k, is_causal=True, config=config).block_mask
    mask_mib = sum(t.numel() * t.element_size() for t in (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices)) / 2**20
    del mask
    with xflex.sparsity() as stats:
        whole = peak_extra_mib(lambda: xflex.sparse_sdpa(q, k, v, is_causal=True, config=config), baseline)
    op_ms = time_once_ms(lambda: xflex.sparse_sdpa(q, k, v, is_causal=True, config=config))
    score_ms = time_once_ms(lambda: call_scores(q, k, pattern, config))
    output_mib = q.numel() * q.element_size() / 2**20
    return (
        f"L={length} S={stride}: density {stats.density:.3f}; peak extra MiB: scoring {scoring:.0f}, "
        f"scoring+selection {planning:.0f}, whole op {whole:.0f} (output {output_mib:.0f}); BlockMask tensors "
        f"{mask_mib:.0f} MiB; xflex {op_ms:.1f} ms, scoring {score_ms:.1f} ms"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=262144)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.long_context measures GPU memory: it needs CUDA")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = llm_like_inputs(args.length)
    for stride in (16, 8):
        print(measure(q, k, v, stride), flush=True)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense_ms = time_once_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    print(f"L={args.length} cuDNN dense {dense_ms:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
