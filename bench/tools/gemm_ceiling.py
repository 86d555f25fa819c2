"""How fast could the scorer's reduced GEMM go? The same product per head,
``(Lq/S x S*D) @ (S*D x Lk/S)`` in bf16 with fp32 accumulation, timed in one run
as:

- ``cublas``: ``torch.bmm`` (writes the bf16 product: the library ceiling);
- ``tiles``: a plain Triton GEMM, one program per output tile, grouped order;
- ``persistent tma``: one program per SM walking the tiles, TMA descriptors
  (the shape of Triton's persistent matmul tutorial);
- ``row sweep``: one program per query tile looping over key tiles with the
  reduction inside, the scorer's loop nest without its softmax;
- ``scorer``: ``antidiagonal_block_scores_triton`` itself, non-causal.

The Triton GEMMs keep a row max per tile instead of writing the product, so
each is a ceiling for a kernel that reduces its tiles in registers. Inputs are
random (timing does not depend on the values).

    python -m bench.tools.gemm_ceiling --length 131072 --heads 8 --strides 8 16
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import sys

import torch
import triton
import triton.language as tl

from bench.common import time_ms

_HEAD_DIM = 128
_BLOCK_M, _BLOCK_N, _BLOCK_K = 128, 256, 64  # the scorer's fastest tile (bench/tools/tune_scoring.py)
_WARPS, _STAGES = 8, 3
_GROUP_M = 8  # query tiles per group in the grouped order (L2 reuse of key tiles)


@triton.jit
def _grouped_tile(tile, n_m, n_n, GROUP_M: tl.constexpr):
    """``(m, n)`` of output tile ``tile`` in the grouped order: GROUP_M query
    tiles sweep the key tiles together."""
    width = GROUP_M * n_n
    first_m = (tile // width) * GROUP_M
    rows = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (tile % width) % rows, (tile % width) // rows


@triton.jit
def _tiles_kernel(q, k, out, M, N, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  GROUP_M: tl.constexpr):  # fmt: skip
    h = tl.program_id(1)
    n_n = tl.cdiv(N, BN)
    pm, pn = _grouped_tile(tl.program_id(0), tl.cdiv(M, BM), n_n, GROUP_M)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    q_ptrs = q + h.to(tl.int64) * M * K + rm[:, None].to(tl.int64) * K + rk[None, :]
    k_ptrs = k + h.to(tl.int64) * N * K + rn[None, :].to(tl.int64) * K + rk[:, None]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kk in range(0, K, BK):
        acc = tl.dot(tl.load(q_ptrs + kk), tl.load(k_ptrs + kk), acc)
    tl.store(out + (h * M + rm) * n_n + pn, tl.max(acc, axis=1))


@triton.jit
def _persistent_tma_kernel(q_desc, k_desc, out, M, N, H, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           BK: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr):  # fmt: skip
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    per_head = n_m * n_n
    for tile in tl.range(tl.program_id(0), per_head * H, NUM_SMS, flatten=True):
        h = tile // per_head
        pm, pn = _grouped_tile(tile % per_head, n_m, n_n, GROUP_M)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for kk in range(K // BK):
            a = q_desc.load([h * M + pm * BM, kk * BK])
            b = k_desc.load([h * N + pn * BN, kk * BK])
            acc = tl.dot(a, b.T, acc)
        rm = pm * BM + tl.arange(0, BM)
        tl.store(out + (h * M + rm) * n_n + pn, tl.max(acc, axis=1))


@triton.jit
def _row_sweep_kernel(q, k, out, M, N, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pm = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    q_ptrs = q + h.to(tl.int64) * M * K + rm[:, None].to(tl.int64) * K + rk[None, :]
    row_max = tl.full([BM], float("-inf"), tl.float32)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        k_ptrs = k + h.to(tl.int64) * N * K + rn[None, :].to(tl.int64) * K + rk[:, None]
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for kk in range(0, K, BK):
            acc = tl.dot(tl.load(q_ptrs + kk), tl.load(k_ptrs + kk), acc)
        row_max = tl.maximum(row_max, tl.max(acc, axis=1))
    tl.store(out + h * M + rm, row_max)


def variants(q: torch.Tensor, k: torch.Tensor, stride: int) -> dict[str, Callable[[], object]]:
    """Name -> zero-argument launch, for ``(1, H, L, D)`` contiguous q and k."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from xflex.attention.scoring.triton_kernel import antidiagonal_block_scores_triton

    H, L, D = q.shape[1:]
    M = N = L // stride
    K = stride * D
    q2, k2 = q.reshape(H * M, K), k.reshape(H * N, K)  # reduced rows are contiguous: views
    n_n = triton.cdiv(N, _BLOCK_N)
    out = torch.empty(H * M * n_n, device=q.device)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    q_desc = TensorDescriptor.from_tensor(q2, [_BLOCK_M, _BLOCK_K])
    k_desc = TensorDescriptor.from_tensor(k2, [_BLOCK_N, _BLOCK_K])
    tile = dict(BM=_BLOCK_M, BN=_BLOCK_N, BK=_BLOCK_K, num_warps=_WARPS, num_stages=_STAGES)
    return {
        "cublas": lambda: torch.bmm(q2.view(H, M, K), k2.view(H, N, K).transpose(1, 2)),
        "tiles": lambda: _tiles_kernel[(triton.cdiv(M, _BLOCK_M) * n_n, H)](
            q2, k2, out, M, N, K, GROUP_M=_GROUP_M, **tile
        ),
        "persistent tma": lambda: _persistent_tma_kernel[(sms,)](
            q_desc, k_desc, out, M, N, H, K, GROUP_M=_GROUP_M, NUM_SMS=sms, **tile
        ),
        "row sweep": lambda: _row_sweep_kernel[(triton.cdiv(M, _BLOCK_M), H)](q2, k2, out, M, N, K, **tile),
        "scorer": lambda: antidiagonal_block_scores_triton(q, k, stride=stride, block_size=128),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=128 * 1024, help="tokens (default 131072)")
    parser.add_argument("--heads", type=int, default=8, help="heads (default 8)")
    parser.add_argument("--strides", type=int, nargs="+", default=[8, 16])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gemm_ceiling.py needs a CUDA GPU")
    torch.manual_seed(0)
    shape = (1, args.heads, args.length, _HEAD_DIM)
    q = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"B=1, H={args.heads}, L={args.length}, D={_HEAD_DIM}, bf16, non-causal")  # fmt: skip
    print("S | variant | ms | TF/s")
    for stride in args.strides:
        flops = 2.0 * (args.length // stride) ** 2 * stride * _HEAD_DIM * args.heads
        for name, run in variants(q, k, stride).items():
            ms = time_ms(run)
            print(f"{stride} | {name} | {ms:.3f} | {flops / ms / 1e9:.0f}", flush=True)


if __name__ == "__main__":
    main()
