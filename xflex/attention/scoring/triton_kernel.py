"""XAttention antidiagonal block scoring (Xu et al., "XAttention: Block Sparse
Attention with Antidiagonal Scoring", ICML 2025): the fused Triton kernel.

Same math as ``reference.antidiagonal_block_scores`` (the plain-torch
reference), computed without ever writing the ``[Lq/S, Lk/S]`` reduced logits:
each program owns ``BLOCK_M`` reduced query rows (whole query blocks), runs the
reduced GEMM ``Qs @ Ks^T`` over key tiles straight from strided q and k, and
keeps an online softmax per row, parking each key block's log-sum-exp in a
scratch; a second kernel turns those into block scores once the rows' totals
are known.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..backends import interpreting
from .reference import PAIRINGS, Pairing, Reduction, validate_reduction, validate_scoring_inputs

__all__ = ["CONFIGS", "antidiagonal_block_scores_triton", "normalise_kernel", "scores_kernel"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634  # 1/ln(2): the kernel works in base 2 (exp2/log2)
# Scratch of per-(query tile, key block) log-sum-exps, fp32: Bs/S times smaller
# than the reduced matrix; long inputs are scored in query chunks that fit it.
_SCRATCH_BYTES = 256 * 2**20

# Tiles are counted in reduced rows (S tokens each): BLOCK_M query tiles by
# BLOCK_N key tiles, the S*D reduction walked BLOCK_K columns per step.
# 128x256 is the largest tile whose fp32 accumulator fits the registers and
# the fastest on an H100/H200; what the kernel loses to a plain GEMM of the
# same shape is the per-tile softmax, during which the tensor cores idle
# (bench/NOTES.md, "Hoisted reduction-loop addressing").
# FLATTEN pipelines the key-tile and reduction loops as one loop, so loads for
# the next key tile overlap the softmax of this one: within 5% either way on an
# H100 (it depends on S and L), hence a tuning choice.
CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "FLATTEN": False}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "FLATTEN": False}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "FLATTEN": False}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "FLATTEN": True}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "FLATTEN": False}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "FLATTEN": False}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "FLATTEN": False}, num_warps=4, num_stages=4),
]
_MAX_BLOCK_M = max(c.kwargs["BLOCK_M"] for c in CONFIGS)  # query chunks are multiples of it
# A program covers whole blocks: some config must have BLOCK_M and BLOCK_N >= Bs/S.
_MAX_TILES_PER_BLOCK = max(min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in CONFIGS)


def _block_k(head_dim: int) -> int:
    """Reduction columns per step: a divisor of D when one is >= 16 (no masking),
    else D rounded up to a power of two (masked; tl.dot needs K >= 16)."""
    divisors = [bk for bk in (64, 32, 16) if head_dim % bk == 0]
    return divisors[0] if divisors else min(64, max(16, triton.next_power_of_2(head_dim)))


def _prune_configs(configs, named_args, **kwargs):
    tiles = kwargs["TILES_PER_BLOCK"]
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] >= tiles and c.kwargs["BLOCK_N"] >= tiles]
    # The interpreter cannot time kernels: it runs the smallest tiles (fastest on CPU).
    return [min(fitting, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])] if interpreting() else fitting


@triton.jit
def _log2(x, FAST: tl.constexpr):
    # tl.log2 is libdevice's exact polynomial, ~15 instructions a value: a
    # quarter of the per-tile softmax (bench/sass_report.py). lg2.approx is one
    # MUFU op, accurate to 2^-22. The interpreter has only tl.log2.
    if FAST:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _reduced_logits(
    q_rows,
    q_row_last,
    k_cols,
    k_row_first,
    q_len,
    k_len,
    stride_ql,
    stride_qd,
    stride_kl,
    stride_kd,
    STRIDE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    MEAN: tl.constexpr,
    MAX: tl.constexpr,
):
    """Two ``[BLOCK_M, BLOCK_N]`` fp32 tiles of reduced logits: with ``MEAN``
    the antidiagonal sums (S times the mean) first, with ``MAX`` the largest of
    the S paired products (second, or both when ``MEAN`` is off; one
    estimate alone is returned twice). Reduction column ``r*D + d``
    pairs query row ``t*S + S-1-r`` (``INTERLEAVED``: ``t*S + sigma(r)``,
    ``reference.paired_query_rows``) with key row ``u*S + r``; rows past the
    sequence read as zero. ``q_rows``/``k_cols`` point at rows ``t*S + S-1`` and
    ``u*S``; ``q_row_last``/``k_row_first`` are those row indices."""
    D_CHUNKS: tl.constexpr = (HEAD_DIM + BLOCK_K - 1) // BLOCK_K
    offs_k = tl.arange(0, BLOCK_K)
    # Tile pointers and row bounds are built once; a step adds a scalar offset
    # and compares the scalar r. Rebuilding them every step cost 160
    # instructions per step (now 136) and ~10% of the time (bench/RESULTS.md).
    q_ptrs = q_rows + offs_k[None, :] * stride_qd
    k_ptrs = k_cols + offs_k[:, None] * stride_kd
    q_lo = (q_row_last - q_len + 1)[:, None]  # query row t has sub-row r iff r >= q_lo[t]
    k_hi = (k_len - k_row_first)[None, :]  # key row u has sub-row r iff r < k_hi[u]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if MAX:
        best = tl.full([BLOCK_M, BLOCK_N], float("-inf"), dtype=tl.float32)
        if MEAN:  # both from the same loads and MMAs: the max needs each offset's product
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for step in range(STRIDE * D_CHUNKS):
        r = step // D_CHUNKS
        d0 = (step % D_CHUNKS) * BLOCK_K
        back = r  # the query row's distance back from the tile's last row
        if INTERLEAVED:  # S-1-sigma(r), sigma(r) = 2r - (S-1) * (2r // S): integer ops only
            back = STRIDE - 1 - 2 * r + (STRIDE - 1) * ((2 * r) // STRIDE)
        q_mask = q_lo <= back
        k_mask = k_hi > r
        if HEAD_DIM % BLOCK_K != 0:
            q_mask = q_mask & (d0 + offs_k < HEAD_DIM)[None, :]
            k_mask = k_mask & (d0 + offs_k < HEAD_DIM)[:, None]
        q_tile = tl.load(q_ptrs + (d0 * stride_qd - back * stride_ql), mask=q_mask, other=0.0)
        k_tile = tl.load(k_ptrs + (d0 * stride_kd + r * stride_kl), mask=k_mask, other=0.0)
        acc = tl.dot(q_tile, k_tile, acc, input_precision=DOT_PRECISION)
        if MAX:
            if step % D_CHUNKS == D_CHUNKS - 1:  # offset r's product is complete
                best = tl.maximum(best, acc)
                if MEAN:
                    total += acc
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if MAX:
        if MEAN:
            return total, best
        return best, best
    return acc, acc


@triton.jit
def _masked_logits(x, t, u, allowed, n_k_tiles, diag_shift, MASKED: tl.constexpr, HAS_CAUSAL: tl.constexpr,
                   HAS_BLOCK_VISIBLE: tl.constexpr, K_BLOCKS: tl.constexpr, TILES_PER_BLOCK: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """``x`` with the tiles row ``t`` does not see (past the keys, the causal
    diagonal, the block mask's ``allowed``) at -inf."""
    if MASKED:
        visible = (u < n_k_tiles)[None, :]
        if HAS_CAUSAL:
            visible = visible & (u[None, :] <= t[:, None] + diag_shift)
        x = tl.where(visible, x, float("-inf"))
    if HAS_BLOCK_VISIBLE:
        x = tl.reshape(x, [BLOCK_M, K_BLOCKS, TILES_PER_BLOCK])
        x = tl.reshape(tl.where(allowed[:, :, None], x, float("-inf")), [BLOCK_M, BLOCK_N])
    return x


@triton.jit
def _block_lse(x, m_i, l_i, FAST_LOG2: tl.constexpr, K_BLOCKS: tl.constexpr, TILES_PER_BLOCK: tl.constexpr,
               BLOCK_M: tl.constexpr):  # fmt: skip
    """One key tile's step of a row's online softmax: the updated row max and
    sum, and the tile's per-key-block log2-sum-exp2."""
    # Block sums relative to the running row max, as flash attention does: a
    # block only underflows to zero when its mass is < 2^-126 of the max.
    # The max is taken over whole rows: per block first costs a shuffle
    # reduction per block.
    m_new = tl.maximum(m_i, tl.max(x, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
    p = tl.reshape(tl.exp2(x - m_ref[:, None]), [BLOCK_M, K_BLOCKS, TILES_PER_BLOCK])
    block_sum = tl.sum(p, axis=2)
    l_i = l_i * tl.exp2(m_i - m_ref) + tl.sum(block_sum, axis=1)
    return m_new, l_i, m_ref[:, None] + _log2(block_sum, FAST_LOG2)


@triton.jit
def _online_softmax_tile(
    q_rows,
    k_base,
    visible_rows,
    scratch_rows,
    second_scratch,
    t,
    u0,
    m_i,
    l_i,
    m_2,
    l_2,
    q_len,
    k_len,
    diag_shift,
    qk_scale,
    stride_ql,
    stride_qd,
    stride_kl,
    stride_kd,
    stride_vq,
    stride_vk,
    STRIDE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    TILES_PER_BLOCK: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_CAUSAL: tl.constexpr,
    HAS_BLOCK_VISIBLE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    MEAN: tl.constexpr,
    MAX: tl.constexpr,
    FAST_LOG2: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One key tile ``[u0, u0 + BLOCK_N)`` of the online softmax: parks the
    tile's per-key-block log2-sum-exp2 in scratch and returns the updated row max
    and sum; with ``MEAN`` and ``MAX`` the max's too (``m_2``, ``l_2``, parked
    at ``second_scratch``, else passed through). ``MASKED`` tiles cross the
    causal diagonal or the last key tile; the others skip the per-element mask.
    ``qk_scale`` is the mean's (``scale / S`` in log2 units)."""
    K_BLOCKS: tl.constexpr = BLOCK_N // TILES_PER_BLOCK
    n_k_tiles = tl.cdiv(k_len, STRIDE)
    n_k_blocks = tl.cdiv(n_k_tiles, TILES_PER_BLOCK)
    u = u0 + tl.arange(0, BLOCK_N)
    kb = u0 // TILES_PER_BLOCK + tl.arange(0, K_BLOCKS)
    if HAS_BLOCK_VISIBLE:  # per (row, key block): [BLOCK_M, K_BLOCKS], not per element
        allowed = (
            tl.load(
                visible_rows + (t // TILES_PER_BLOCK)[:, None] * stride_vq + kb[None, :] * stride_vk,
                mask=(t < tl.cdiv(q_len, STRIDE))[:, None] & (kb < n_k_blocks)[None, :],
                other=0,
            )
            != 0
        )
        # Key blocks the block mask hides from every row are skipped, not computed.
        has_keys = tl.max(allowed.to(tl.int32)) > 0
    else:
        allowed = True  # unused: _masked_logits reads it with HAS_BLOCK_VISIBLE only
        has_keys = True
    block_lse = tl.full([BLOCK_M, K_BLOCKS], float("-inf"), dtype=tl.float32)
    second_lse = tl.full([BLOCK_M, K_BLOCKS], float("-inf"), dtype=tl.float32)
    if has_keys:
        k_row_first = u * STRIDE
        first, second = _reduced_logits(
            q_rows,
            t * STRIDE + STRIDE - 1,
            k_base + k_row_first.to(tl.int64)[None, :] * stride_kl,
            k_row_first,
            q_len,
            k_len,
            stride_ql,
            stride_qd,
            stride_kl,
            stride_kd,
            STRIDE,
            HEAD_DIM,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            DOT_PRECISION,
            INTERLEAVED,
            MEAN,
            MAX,
        )
        x = first * qk_scale if MEAN else first * (qk_scale * STRIDE)
        x = _masked_logits(x, t, u, allowed, n_k_tiles, diag_shift, MASKED, HAS_CAUSAL, HAS_BLOCK_VISIBLE,
                           K_BLOCKS, TILES_PER_BLOCK, BLOCK_M, BLOCK_N)  # fmt: skip
        m_i, l_i, block_lse = _block_lse(x, m_i, l_i, FAST_LOG2, K_BLOCKS, TILES_PER_BLOCK, BLOCK_M)
        if MEAN and MAX:
            x = _masked_logits(second * (qk_scale * STRIDE), t, u, allowed, n_k_tiles, diag_shift, MASKED, HAS_CAUSAL,
                               HAS_BLOCK_VISIBLE, K_BLOCKS, TILES_PER_BLOCK, BLOCK_M, BLOCK_N)  # fmt: skip
            m_2, l_2, second_lse = _block_lse(x, m_2, l_2, FAST_LOG2, K_BLOCKS, TILES_PER_BLOCK, BLOCK_M)
    tl.store(scratch_rows + kb[None, :], block_lse, mask=(kb < n_k_blocks)[None, :])
    if MEAN and MAX:
        tl.store(second_scratch + kb[None, :], second_lse, mask=(kb < n_k_blocks)[None, :])
    return m_i, l_i, m_2, l_2


@triton.autotune(
    configs=CONFIGS,
    key=["STRIDE", "HEAD_DIM", "TILES_PER_BLOCK", "HAS_CAUSAL", "HAS_BLOCK_VISIBLE", "SPLIT_KEYS", "MEAN", "MAX"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def scores_kernel(
    q_ptr,
    k_ptr,
    visible_ptr,
    scratch_ptr,
    row_lse_ptr,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vq,
    stride_vk,
    stride_sh,
    stride_sr,
    stride_rh,
    stride_rp,
    num_heads,
    group_size,
    q_len,
    k_len,
    tile_start,
    diag_shift,
    qk_scale,
    STRIDE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    TILES_PER_BLOCK: tl.constexpr,
    HAS_CAUSAL: tl.constexpr,
    HAS_BLOCK_VISIBLE: tl.constexpr,
    SPLIT_KEYS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    MEAN: tl.constexpr,
    MAX: tl.constexpr,
    FAST_LOG2: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    """One program: ``BLOCK_M`` reduced query rows of one (batch, query head),
    against key range ``program_id(2)`` of ``num_programs(2)`` (whole
    ``BLOCK_N`` tiles; each range writes its own part of the row statistics).
    Reduced row ``t`` sees key tile ``u`` when ``u < ceil(Lk/S)``, ``u <= t +
    diag_shift`` (causal) and the block-level mask allows ``(t//T, u//T)``.
    ``SPLIT_KEYS`` (more than one range) only keys the autotuner: launches of a
    few rows split over their keys tune apart from whole-row launches. With
    ``MEAN`` and ``MAX`` the max's statistics go to the heads
    ``num_programs(1)`` past the mean's in scratch and row_lse."""
    # One GEMM pass (online softmax, per-block log-sum-exps parked in scratch and
    # renormalised by normalise_kernel) rather than two: the reduced GEMM is the cost.
    tl.static_assert(BLOCK_M % TILES_PER_BLOCK == 0)
    tl.static_assert(BLOCK_N % TILES_PER_BLOCK == 0)
    tl.static_assert(BLOCK_K >= 16)

    # Heaviest (causal: last) query rows first.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    n_q_tiles = tl.cdiv(q_len, STRIDE)
    n_k_tiles = tl.cdiv(k_len, STRIDE)

    t_first = tile_start + pid_m * BLOCK_M
    local_t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row within this launch's chunk
    t = tile_start + local_t
    q_row_last = t * STRIDE + STRIDE - 1
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_row_last.to(tl.int64)[:, None] * stride_ql
    k_base = k_ptr + b.to(tl.int64) * stride_kb + (h // group_size).to(tl.int64) * stride_kh
    visible_rows = visible_ptr + b * stride_vb + h * stride_vh
    scratch_rows = scratch_ptr + pid_bh.to(tl.int64) * stride_sh + local_t[:, None] * stride_sr
    second_scratch = scratch_rows + tl.num_programs(1).to(tl.int64) * stride_sh

    # Key tiles [0, unmasked_end) are visible to every row of the program (rows
    # past the sequence are dropped at the end); [unmasked_end, k_tile_end) cross
    # the causal diagonal or the last key tile and take the element mask.
    k_tile_end = n_k_tiles
    unmasked_end = n_k_tiles // BLOCK_N * BLOCK_N
    if HAS_CAUSAL:
        last_t = tl.minimum(t_first + BLOCK_M, n_q_tiles) - 1
        k_tile_end = tl.minimum(k_tile_end, last_t + diag_shift + 1)  # later tiles never load
        unmasked_end = tl.minimum(unmasked_end, tl.maximum(t_first + diag_shift + 1, 0) // BLOCK_N * BLOCK_N)

    # This program's key range: whole BLOCK_N tiles, so the split leaves the
    # unmasked / masked boundary (a multiple of BLOCK_N) where it was.
    range_tiles = tl.cdiv(tl.cdiv(n_k_tiles, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    range_start = tl.program_id(2) * range_tiles
    range_end = tl.minimum(k_tile_end, range_start + range_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(x - m_i)
    m_2, l_2 = m_i, l_i  # the max's, with MEAN and MAX
    for u0 in tl.range(range_start, tl.minimum(unmasked_end, range_end), BLOCK_N, flatten=FLATTEN):
        m_i, l_i, m_2, l_2 = _online_softmax_tile(
            q_rows, k_base, visible_rows, scratch_rows, second_scratch, t, u0, m_i, l_i, m_2, l_2, q_len, k_len,
            diag_shift, qk_scale, stride_ql, stride_qd, stride_kl, stride_kd, stride_vq, stride_vk, STRIDE, HEAD_DIM,
            TILES_PER_BLOCK, MASKED=False, HAS_CAUSAL=HAS_CAUSAL, HAS_BLOCK_VISIBLE=HAS_BLOCK_VISIBLE,
            DOT_PRECISION=DOT_PRECISION, INTERLEAVED=INTERLEAVED, MEAN=MEAN, MAX=MAX, FAST_LOG2=FAST_LOG2,
            BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        )  # fmt: skip
    for u0 in range(tl.maximum(range_start, unmasked_end), range_end, BLOCK_N):
        m_i, l_i, m_2, l_2 = _online_softmax_tile(
            q_rows, k_base, visible_rows, scratch_rows, second_scratch, t, u0, m_i, l_i, m_2, l_2, q_len, k_len,
            diag_shift, qk_scale, stride_ql, stride_qd, stride_kl, stride_kd, stride_vq, stride_vk, STRIDE, HEAD_DIM,
            TILES_PER_BLOCK, MASKED=True, HAS_CAUSAL=HAS_CAUSAL, HAS_BLOCK_VISIBLE=HAS_BLOCK_VISIBLE,
            DOT_PRECISION=DOT_PRECISION, INTERLEAVED=INTERLEAVED, MEAN=MEAN, MAX=MAX, FAST_LOG2=FAST_LOG2,
            BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        )  # fmt: skip

    # Each row's log2-sum-exp2 over this range (-inf: it sees no key here); the
    # normaliser combines the ranges and drops rows past the sequence.
    row_parts = row_lse_ptr + pid_bh.to(tl.int64) * stride_rh + tl.program_id(2) * stride_rp + local_t
    tl.store(row_parts, tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf")))
    if MEAN and MAX:
        row_parts += tl.num_programs(1).to(tl.int64) * stride_rh
        tl.store(row_parts, tl.where(l_2 > 0, m_2 + tl.log2(tl.where(l_2 > 0, l_2, 1.0)), float("-inf")))


@triton.jit
def normalise_kernel(
    scratch_ptr,
    row_lse_ptr,
    out_ptr,
    stride_sh,
    stride_sr,
    stride_rh,
    stride_rp,
    stride_ob,
    stride_oh,
    stride_oq,
    num_heads,
    q_len,
    k_len,
    tile_start,
    diag_shift,
    n_parts,
    STRIDE: tl.constexpr,
    TILES_PER_BLOCK: tl.constexpr,
    HAS_CAUSAL: tl.constexpr,
    ROWS: tl.constexpr,
    NORM_BLOCKS: tl.constexpr,
):
    """Block scores of ``ROWS`` reduced query rows (whole query blocks) of one
    (batch, head): the sum over a block's rows of ``exp2(block_lse - row_lse)``,
    ``row_lse`` the log2-sum-exp2 of the row's ``n_parts`` parts (the scorers
    that split a row's keys write one part each). Row ``t`` reads the key
    blocks up to its causal diagonal, all of which the scorer wrote (its
    programs end at their last row's diagonal)."""
    # A kernel of its own, not a tail of the scoring kernel: there it kept each
    # SM's tensor cores idle while it waited on memory (bench/NOTES.md, "The
    # normalisation pass as its own kernel").
    Q_BLOCKS: tl.constexpr = ROWS // TILES_PER_BLOCK
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    n_k_blocks = tl.cdiv(tl.cdiv(k_len, STRIDE), TILES_PER_BLOCK)
    n_q_tiles = tl.cdiv(q_len, STRIDE)
    n_q_blocks = tl.cdiv(n_q_tiles, TILES_PER_BLOCK)
    t_first = tile_start + tl.program_id(0) * ROWS
    local_t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # row within this launch's chunk
    t = tile_start + local_t
    # Key blocks row t reads: none past the sequence (the scoring kernel's last
    # program may stop short of this one's rows), else up to its diagonal.
    row_kb_end = tl.where(t < n_q_tiles, n_k_blocks, 0)
    if HAS_CAUSAL:
        row_kb_end = tl.minimum(row_kb_end, tl.cdiv(tl.maximum(t + diag_shift + 1, 0), TILES_PER_BLOCK))
    kb_end = tl.max(row_kb_end)
    parts = row_lse_ptr + pid_bh.to(tl.int64) * stride_rh + local_t
    part_max = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    for i in range(n_parts):
        part_max = tl.maximum(part_max, tl.load(parts + i * stride_rp, mask=t < n_q_tiles, other=float("-inf")))
    part_sum = tl.zeros([ROWS], dtype=tl.float32)
    for i in range(n_parts):
        part_sum += tl.exp2(tl.load(parts + i * stride_rp, mask=t < n_q_tiles, other=float("-inf")) - part_max)
    # Rows past the sequence or seeing no key get lse = +inf: they add nothing.
    sees_any = part_max > float("-inf")
    row_lse = tl.where(sees_any, part_max + tl.log2(tl.where(sees_any, part_sum, 1.0)), float("inf"))
    scratch_rows = scratch_ptr + pid_bh.to(tl.int64) * stride_sh + local_t[:, None] * stride_sr
    q_block = t_first // TILES_PER_BLOCK + tl.arange(0, Q_BLOCKS)
    out_rows = out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + q_block[:, None] * stride_oq
    for kb0 in range(0, kb_end, NORM_BLOCKS):
        kb = kb0 + tl.arange(0, NORM_BLOCKS)
        block_lse = tl.load(scratch_rows + kb[None, :], mask=kb[None, :] < row_kb_end[:, None], other=float("-inf"))
        probs = tl.exp2(block_lse - row_lse[:, None])
        scores = tl.sum(tl.reshape(probs, [Q_BLOCKS, TILES_PER_BLOCK, NORM_BLOCKS]), axis=1)
        tl.store(out_rows + kb[None, :], scores, mask=(q_block < n_q_blocks)[:, None] & (kb < kb_end)[None, :])


def _validate_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    stride: int,
    block_size: int,
    scale: float | None,
    causal_offset: int | None,
    block_visible: torch.Tensor | None,
    dtypes: tuple[torch.dtype, ...] = _DTYPES,
) -> None:
    if q.dtype not in dtypes or k.dtype != q.dtype:
        raise ValueError(f"q and k must share a dtype among {dtypes}, but got q.dtype={q.dtype} and k.dtype={k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, but got q on {q.device} and k on {k.device}")
    if not q.is_cuda and not interpreting():
        raise ValueError(f"q and k must be CUDA tensors (or run with TRITON_INTERPRET=1), but got device {q.device}")
    tiles = block_size // stride
    if tiles < 1 or tiles & (tiles - 1) or tiles > _MAX_TILES_PER_BLOCK:
        raise ValueError(
            f"block_size // stride must be a power of two <= {_MAX_TILES_PER_BLOCK}, "
            f"but got block_size={block_size} and stride={stride}"
        )
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be None or a finite float, but got scale={scale!r}")
    if causal_offset is not None and not isinstance(causal_offset, int):
        raise ValueError(f"causal_offset must be None or an int, but got causal_offset={causal_offset!r}")
    if block_visible is not None:
        B, Hq = q.shape[:2]
        blocks = (math.ceil(q.shape[2] / block_size), math.ceil(k.shape[2] / block_size))
        shape = tuple(block_visible.shape)
        if (
            block_visible.dtype != torch.bool
            or block_visible.dim() != 4
            or shape[0] not in (1, B)
            or shape[1] not in (1, Hq)
            or shape[2:] != blocks
            or block_visible.device != q.device
        ):
            raise ValueError(
                f"block_visible must be a bool tensor of shape (B|1, Hq|1, nQ, nK)=({B}|1, {Hq}|1, {blocks[0]}, "
                f"{blocks[1]}) on {q.device}, but got {block_visible.dtype} of shape {shape} on {block_visible.device}"
            )


def antidiagonal_block_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    stride: int,
    block_size: int,
    scale: float | None = None,
    causal_offset: int | None = None,
    block_visible: torch.Tensor | None = None,
    use_gluon: bool = False,
    key_ranges: int | None = None,
    pairing: Pairing = "antidiagonal",
    reduction: Reduction = "mean",
    head_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block importance scores from antidiagonal sums, in one fused Triton kernel.

    Exactly ``antidiagonal_block_scores`` (same arguments and result) without the
    reduced matrix in memory; q and k may be non-contiguous, K heads are shared
    by their ``Hq // Hkv`` query heads without copies.

    Args:
        q: ``(B, Hq, Lq, D)`` fp16/bf16/fp32 queries on CUDA.
        k: ``(B, Hkv, Lk, D)`` keys of q's dtype; ``Hq`` a multiple of ``Hkv``.
        stride: antidiagonal length ``S``; ``block_size // S`` a power of two <= 128.
        block_size: attention block size ``Bs``.
        scale: softmax scale of the attention (``1/sqrt(D)`` when None),
            applied to the reduced logit.
        causal_offset: None for no causal mask, else the diagonal offset
            (0: top-left ``is_causal``; ``Lk - Lq``: bottom-right).
        block_visible: optional ``(B|1, Hq|1, nQ, nK)`` bool; key tiles in
            invisible blocks are left out of the softmax (and never computed).
        use_gluon: launch the warp-specialised Gluon kernel (``gluon_kernel``)
            instead of the Triton one; the caller checks that it can run the
            inputs (``xflex.attention.scoring.scoring_backend`` does).
        key_ranges: Triton kernel: programs per query rows, each over its own
            range of the keys (None: enough to fill the GPU when the rows alone
            do not, as for a few probe rows; 1 on the CPU).
        pairing: which query row each key row of a tile pairs with
            (``reference.paired_query_rows``).
        reduction: the reduced logit is the mean of the tile's S paired
            products or their max (``reference.Reduction``); ``"mean+max"``
            computes both in one pass (the same loads and MMAs), on either
            kernel.
        head_scale: with ``use_gluon`` only, for e4m3 q and k
            (``fp8.fp8_per_head``): per query head, the factor their products
            are multiplied by (``fp8.head_scales``).

    Returns:
        ``(B, Hq, ceil(Lq/Bs), ceil(Lk/Bs))`` fp32 scores; each query-block row
        sums to the number of its query tiles that see any key. ``"mean+max"``:
        ``(2, B, Hq, ...)``, the mean's then the max's.

    Example:
        >>> q = torch.randn(1, 32, 8192, 128, device="cuda", dtype=torch.bfloat16)
        >>> k = torch.randn(1, 8, 8192, 128, device="cuda", dtype=torch.bfloat16)
        >>> antidiagonal_block_scores_triton(q, k, stride=16, block_size=128, causal_offset=0).shape
        torch.Size([1, 32, 64, 64])
    """
    validate_scoring_inputs(q, k, stride, block_size)
    fp8 = head_scale is not None
    if fp8 and not use_gluon:
        raise ValueError("head_scale (fp8 inputs) needs use_gluon=True: only the Gluon scorer multiplies fp8")
    _validate_triton(q, k, stride, block_size, scale, causal_offset, block_visible,
                     (torch.float8_e4m3fn,) if fp8 else _DTYPES)  # fmt: skip
    if fp8 and (head_scale.shape != (q.shape[0] * q.shape[1],) or head_scale.dtype != torch.float32):
        raise ValueError(f"head_scale must be fp32 of shape ({q.shape[0] * q.shape[1]},), but got "
                         f"{head_scale.dtype} of shape {tuple(head_scale.shape)}")  # fmt: skip
    if key_ranges is not None and (not isinstance(key_ranges, int) or key_ranges < 1):
        raise ValueError(f"key_ranges must be None or a positive int, but got key_ranges={key_ranges!r}")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, but got pairing={pairing!r}")
    validate_reduction(reduction)
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    S, tiles = stride, block_size // stride
    n_q_tiles, n_k_blocks = math.ceil(Lq / S), math.ceil(Lk / block_size)
    estimates = reduction.split("+")
    # Each estimate's heads one after the other (the kernel writes the max's
    # num_programs(1) heads on), as n_est * B batches for the normaliser.
    out = torch.zeros((len(estimates) * B, Hq, math.ceil(Lq / block_size), n_k_blocks), dtype=torch.float32, device=q.device)
    result = out.unflatten(0, (len(estimates), B)) if len(estimates) > 1 else out
    if out.numel() == 0:
        return result
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    # Query chunks (multiples of the largest BLOCK_M) whose scratch fits the budget.
    per_row = len(estimates) * B * Hq * n_k_blocks * 4
    rows = max(1, _SCRATCH_BYTES // (per_row * _MAX_BLOCK_M)) * _MAX_BLOCK_M
    rows = min(rows, triton.cdiv(n_q_tiles, _MAX_BLOCK_M) * _MAX_BLOCK_M)
    scratch = torch.empty((len(estimates) * B * Hq, rows, n_k_blocks), dtype=torch.float32, device=q.device)
    if use_gluon:
        from . import gluon_kernel

        # Same tile counts (ceil(L/S)) and key ranges as the unpadded lengths.
        q, k = gluon_kernel.whole_groups(q, S), gluon_kernel.whole_groups(k, S)
    # Row parts: the Gluon kernel's two consumers each see half of each key range.
    if use_gluon:
        parts = 2 * gluon_kernel.key_ranges(Lk, S)
    else:
        parts = _triton_key_ranges(q, min(rows, n_q_tiles), math.ceil(Lk / S)) if key_ranges is None else key_ranges
    row_lse = torch.empty((len(estimates) * B * Hq, parts, rows), dtype=torch.float32, device=q.device)
    visible = block_visible.expand(B, Hq, -1, -1) if block_visible is not None else out
    diag_shift = 0 if causal_offset is None else (S - 1 + causal_offset) // S
    for tile_start in range(0, n_q_tiles, rows):
        chunk = min(rows, n_q_tiles - tile_start)
        launch_args = dict(
            stride=S,
            tiles_per_block=tiles,
            tile_start=tile_start,
            chunk=chunk,
            diag_shift=diag_shift,
            qk_scale=scale / S * _LOG2E,  # the mean's; the kernel's max multiplies it by S
            causal=causal_offset is not None,
            interleaved=pairing == "interleaved",
        )
        if use_gluon:
            gluon_kernel.launch(q, k, scratch, row_lse, reduction=reduction, head_scale=head_scale, **launch_args)
        else:
            has_block_visible = block_visible is not None
            _launch_triton_scorer(
                q, k, scratch, row_lse, visible=visible, has_block_visible=has_block_visible, key_ranges=parts,
                reduction=reduction, **launch_args,
            )  # fmt: skip
        normalise_kernel[(triton.cdiv(chunk, _MAX_BLOCK_M), len(estimates) * B * Hq)](
            scratch,
            row_lse,
            out,
            scratch.stride(0),
            scratch.stride(1),
            row_lse.stride(0),
            row_lse.stride(1),
            *out.stride()[:3],
            Hq,
            Lq,
            Lk,
            tile_start,
            diag_shift,
            parts,
            STRIDE=S,
            TILES_PER_BLOCK=tiles,
            HAS_CAUSAL=causal_offset is not None,
            ROWS=_MAX_BLOCK_M,  # whole query blocks: a multiple of Bs/S
            NORM_BLOCKS=32,  # key blocks a step
        )
    return result


def _triton_key_ranges(q: torch.Tensor, q_tiles: int, n_k_tiles: int) -> int:
    """Key ranges per query rows for the Triton kernel: 1 where the rows'
    programs fill the GPU, else enough for two programs per SM, each range at
    least one 256-tile step. Few rows against many keys (the probe rows of the
    break-even forecast and the adaptive method) otherwise run one long loop
    per head on a few SMs (bench/RESULTS.md, "With each call site's density
    history")."""
    if not q.is_cuda:
        return 1
    programs = q.shape[0] * q.shape[1] * triton.cdiv(q_tiles, _MAX_BLOCK_M)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), n_k_tiles // 256))


def _launch_triton_scorer(
    q: torch.Tensor,
    k: torch.Tensor,
    scratch: torch.Tensor,
    row_lse: torch.Tensor,
    *,
    visible: torch.Tensor,
    has_block_visible: bool,
    key_ranges: int,
    stride: int,
    tiles_per_block: int,
    tile_start: int,
    chunk: int,
    diag_shift: int,
    qk_scale: float,
    causal: bool,
    interleaved: bool,
    reduction: Reduction,
) -> None:
    """``scores_kernel`` on query rows ``[tile_start, tile_start +
    chunk)``, each row's keys in ``key_ranges`` parts, for the estimate(s)
    ``reduction`` names; ``gluon_kernel.launch``'s contract."""
    B, Hq, Lq, D = q.shape
    estimates = reduction.split("+")
    scores_kernel[lambda meta: (triton.cdiv(chunk, meta["BLOCK_M"]), B * Hq, key_ranges)](
        q,
        k,
        visible,
        scratch,
        row_lse,
        *q.stride(),
        *k.stride(),
        *visible.stride(),
        scratch.stride(0),
        scratch.stride(1),
        row_lse.stride(0),
        row_lse.stride(1),
        Hq,
        Hq // k.shape[1],
        Lq,
        k.shape[2],
        tile_start,
        diag_shift,
        qk_scale,
        STRIDE=stride,
        HEAD_DIM=D,
        TILES_PER_BLOCK=tiles_per_block,
        HAS_CAUSAL=causal,
        HAS_BLOCK_VISIBLE=has_block_visible,
        SPLIT_KEYS=key_ranges > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        INTERLEAVED=interleaved,
        MEAN="mean" in estimates,
        MAX="max" in estimates,
        FAST_LOG2=q.device.type != "cpu",  # the interpreter (CPU tensors) lacks libdevice
        BLOCK_K=_block_k(D),
    )
