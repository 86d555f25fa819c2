"""Exact attention mass per key block for a few query rows, in one Triton
kernel: the probe pass of ``oracle.exact_block_mass``.

A probe row's mass per key block is a flash-attention forward without the
value product: ``q_row @ K^T``, an online softmax, and one log-sum-exp per
key block. Each program owns ``BLOCK_M`` rows of one (batch, query head) and
one range of key blocks; the rows are any positions (a gather, not a slice),
each with its own causal limit, so probe rows need not be contiguous.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .backends import interpreting

__all__ = ["row_block_mass_triton"]

_LOG2E = 1.4426950408889634  # the kernel works in base 2 (exp2/log2)
# Rows per program (tl.dot needs >= 16) as the key split counts them; the
# autotuner picks 64 or 128.
_BLOCK_M = 64


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128}, num_warps=4, num_stages=3),
    ],
    key=["HEAD_DIM", "BLOCK_N", "HAS_CAUSAL"],
    # The interpreter cannot time kernels: it runs the first config.
    prune_configs_by={"early_config_prune": lambda configs, named_args, **kwargs: configs[:1] if interpreting() else configs},
)
@triton.jit
def _row_block_lse_kernel(
    q_ptr,
    k_ptr,
    rows_ptr,
    lse_ptr,
    row_lse_ptr,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    num_heads,
    group_size,
    n_rows,
    k_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Rows ``[pid0 * BLOCK_M, +BLOCK_M)`` of head ``pid1`` against key blocks
    range ``pid2`` of ``num_programs(2)``: writes each (row, key block)'s
    log2-sum-exp2 of scaled logits to ``lse`` (B*H, R, nK) and each row's
    over the range to ``row_lse`` (B*H, parts, R). Row ``r`` at position
    ``p`` sees key ``j`` when ``j < k_len`` and (causal) ``j <= p``."""
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < n_rows
    pos = tl.load(rows_ptr + r, mask=row_ok, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        + pos.to(tl.int64)[:, None] * stride_ql + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :],
        other=0.0,
    )  # fmt: skip
    k_base = k_ptr + b.to(tl.int64) * stride_kb + (h // group_size).to(tl.int64) * stride_kh
    last_key = tl.minimum(pos, k_len - 1) if HAS_CAUSAL else tl.zeros([BLOCK_M], tl.int32) + (k_len - 1)

    n_k_blocks = tl.cdiv(k_len, BLOCK_N)
    per_range = tl.cdiv(n_k_blocks, tl.num_programs(2))
    kb_start = tl.program_id(2) * per_range
    kb_end = tl.minimum(n_k_blocks, kb_start + per_range)
    if HAS_CAUSAL:  # blocks past every row's diagonal are never loaded (their lse stays -inf)
        kb_end = tl.minimum(kb_end, tl.max(tl.where(row_ok, last_key, 0)) // BLOCK_N + 1)

    lse_rows = lse_ptr + pid_bh.to(tl.int64) * n_rows * n_k_blocks + r.to(tl.int64) * n_k_blocks
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(
            k_base + offs_n.to(tl.int64)[None, :] * stride_kl + offs_d[:, None] * stride_kd,
            mask=(offs_n < k_len)[None, :] & (offs_d < HEAD_DIM)[:, None],
            other=0.0,
        )
        x = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        x = tl.where(offs_n[None, :] <= last_key[:, None], x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
        block_sum = tl.sum(tl.exp2(x - m_ref[:, None]), axis=1)
        l_i = l_i * tl.exp2(m_i - m_ref) + block_sum
        m_i = m_new
        tl.store(lse_rows + kb, m_ref + tl.log2(block_sum), mask=row_ok)
    row_lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(row_lse_ptr + (pid_bh * tl.num_programs(2) + tl.program_id(2)).to(tl.int64) * n_rows + r, row_lse, mask=row_ok)


def _key_ranges(programs: int, n_k_blocks: int, device: torch.device) -> int:
    """Key-block ranges per rows: enough for four programs per SM (a few probe
    rows against many keys would otherwise run one long loop on a few SMs),
    each range at least eight blocks; 1 on the CPU interpreter."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(4 * sms, programs), n_k_blocks // 8))


def row_block_mass_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    rows: torch.Tensor,
    *,
    is_causal: bool,
    scale: float | None,
    block_size: int,
) -> torch.Tensor:
    """Exact softmax mass per key block of the query rows at ``rows``.

    Args:
        query: ``(B, Hq, Lq, D)`` fp16/bf16/fp32 on CUDA (or CPU tensors under
            ``TRITON_INTERPRET=1``); key ``(B, Hkv, Lk, D)``, ``Hq`` a multiple
            of ``Hkv`` (GQA without copies).
        rows: ``(R,)`` int32 query positions in ``[0, Lq)``, on query's device.
        is_causal: SDPA's top-left mask: the row at position ``p`` sees keys ``<= p``.
        scale: softmax scale (``1/sqrt(D)`` when None).
        block_size: key block size, a power of two in [16, 256].

    Returns:
        ``(B, Hq, R, ceil(Lk / block_size))`` fp32; each row sums to 1.

    Example:
        >>> q = k = torch.randn(1, 2, 512, 64, device="cuda")
        >>> rows = torch.tensor([0, 300, 511], dtype=torch.int32, device="cuda")
        >>> row_block_mass_triton(q, k, rows, is_causal=True, scale=None, block_size=128).sum(-1)
        tensor([[[1.0000, 1.0000, 1.0000],
                 [1.0000, 1.0000, 1.0000]]], device='cuda:0')
    """
    if not (query.is_cuda or interpreting()):
        raise ValueError(f"query must be a CUDA tensor (or run with TRITON_INTERPRET=1), but got {query.device}")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32) or key.dtype != query.dtype:
        raise ValueError(f"query and key must share a float dtype, but got {query.dtype} and {key.dtype}")
    if block_size not in (16, 32, 64, 128, 256):
        raise ValueError(f"block_size must be a power of two in [16, 256], but got block_size={block_size}")
    if rows.dtype != torch.int32 or rows.dim() != 1 or rows.device != query.device:
        raise ValueError(f"rows must be a 1-D int32 tensor on {query.device}, but got {rows.dtype} {tuple(rows.shape)} "
                         f"on {rows.device}")  # fmt: skip
    B, Hq, _, D = query.shape
    Lk, R = key.shape[2], rows.shape[0]
    n_k_blocks = math.ceil(Lk / block_size)
    parts = _key_ranges(B * Hq * triton.cdiv(R, _BLOCK_M), n_k_blocks, query.device)
    lse = torch.full((B * Hq, R, n_k_blocks), float("-inf"), dtype=torch.float32, device=query.device)
    row_lse = torch.empty((B * Hq, parts, R), dtype=torch.float32, device=query.device)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    _row_block_lse_kernel[lambda meta: (triton.cdiv(R, meta["BLOCK_M"]), B * Hq, parts)](
        query, key, rows, lse, row_lse, *query.stride(), *key.stride(), Hq, Hq // key.shape[1], R, Lk,
        scale * _LOG2E, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_N=block_size,
        HAS_CAUSAL=is_causal, DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    total = torch.logsumexp(row_lse * math.log(2.0), 1) / math.log(2.0)  # (B*H, R): the parts combined
    mass = torch.exp2(lse - total[..., None]).nan_to_num_(0.0)  # a row that sees no key: zeros
    return mass.view(B, Hq, R, n_k_blocks)
