"""The antidiagonal scorer for Hopper (sm_90), warp-specialised in Gluon.

Same contract as ``triton_kernel.scores_kernel`` (per key block
log2-sum-exp2 in scratch, each row's log2-sum-exp2 in ``row_lse``), for the
inputs it covers (``unsupported_reason``) and each reduction
(``reference.REDUCTIONS``). What it adds is overlap: in the Triton kernel all warps run
the per-tile softmax at once while the tensor cores idle (19% of its time,
bench/NOTES.md, "Profile of the Triton kernel"). Here two consumer warpgroups
own the same 128 reduced query rows and alternate 128-key tiles (64 for the
max and the union: ``MAX_BLOCK_N``; consumer w takes tiles w, w+2, ...), so
one's softmax, and the max's per-offset maximum, run under the other's MMAs. They share a ring of Q chunks (a chunk is freed once both used it) and
each has its own ring of K chunks; three one-warp producers issue the TMA
loads. Consumer 1 starts a few chunks behind consumer 0, so their softmaxes
fall at different times. A program takes one ``KEY_RANGE`` of the keys, so a
row block's keys are split over several programs. Each consumer keeps its own
online softmax over its tiles and writes its part of the row statistics
(``row_lse[:, 2*range + w]``); the normaliser combines the parts.

The reduced rows are strided views of q and k, read by TMA as 5-D boxes
``[1, 1, rows, 1, BLOCK_K]`` of ``[B, H, L/S, S, D]``: reduction column
``r*D + d`` is query row ``t*S + S-1-r`` and key row ``u*S + r``. TMA fills
rows past ``L/S`` with zeros, but a partial last group of S rows would read
past the sequence: other lengths are scored on a copy with zero rows up to a
multiple of S (``whole_groups``), which add nothing to a reduced row's dot
product, as the reference's padding.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .reference import Reduction, validate_reduction

__all__ = [
    "CONFIG",
    "FP8_CONFIG",
    "KEY_RANGE",
    "kernel_config",
    "key_ranges",
    "launch",
    "scores_kernel",
    "unsupported_reason",
    "whole_groups",
]

# Tile rows (reduced rows): 128 queries x 128 keys per consumer, the largest
# fp32 accumulator a warpgroup holds beside the softmax (128 registers a thread).
BLOCK_M = 128
BLOCK_N = 128
# The max reduction holds two tiles, each offset's product and the running max
# of them (the union a third, the sum): 64 keys each, so that they fit beside
# the softmax in a warpgroup's registers.
MAX_BLOCK_N = 64
# Reduced key rows a program takes (8 pairs of key tiles): the programs of a
# row block split its keys, so those in flight at once are a few heads' query
# row blocks by key ranges, whose q and k stay in L2, and all do about the same
# work. Against whole rows per program, on an H200 (bench/NOTES.md, "Key ranges
# per program"): 9-11% less time at 64K-128K, S=8; 1024 about the same, 4096
# slower, 512 mixed.
KEY_RANGE = 2048
# Measured on an H200 (bench/NOTES.md, "The Gluon scorer"): BLOCK_K 32 with deeper
# rings is 4-10% slower, two K stages (to deepen the Q ring) 4-17% slower.
# Q_DEPTH - 2 is consumer 1's head start, in chunks: the rest is prefetch.
CONFIG = dict(BLOCK_K=64, Q_DEPTH=7, K_DEPTH=3)
# fp8 inputs where the head dim is a multiple of its BLOCK_K (else CONFIG):
# chunks of 128 one-byte columns, the bytes of CONFIG's.
FP8_CONFIG = dict(BLOCK_K=128, Q_DEPTH=7, K_DEPTH=3)
_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16, torch.float8_e4m3fn: gl.float8e4nv}
# Registers a thread: the kernel is launched with 12 warps at _MAX_REGS; the
# producers' warpgroup gives its registers to the consumers (256 and 232).
_MAX_REGS = 168
_CONSUMER_REGS = 232
_PRODUCER_REGS = 24

# Triton 3.9 renamed Hopper's TMA load; 3.6 (the GPU machine's) has the old name only.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _fast_log2(x):
    # lg2.approx: one MUFU op, accurate to 2^-22 (the Triton kernel's fast_log2f).
    return gl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _load_partition(
    desc, bufs, ready, empty, b, head, first_row, row_step, tiles, PAIRED: gl.constexpr, STRIDE: gl.constexpr,
    HEAD_DIM: gl.constexpr, ELEMENT_BITS: gl.constexpr,
):  # fmt: skip
    """Producer: ``tiles`` tiles of reduced rows (``first_row + i*row_step``),
    each as ``STRIDE * HEAD_DIM / BLOCK_K`` chunks, into the ring ``bufs``.
    Chunk c is sub-row r = c // (D / BLOCK_K) of each row, or for queries the
    row r pairs with (``PAIRED``: 1 the antidiagonal's S-1-r, 2 the interleaved
    pairing's, ``reference.paired_query_rows``), and columns from
    (c % (D / BLOCK_K)) * BLOCK_K."""
    DEPTH: gl.constexpr = bufs.type.shape[0]
    ROWS: gl.constexpr = bufs.type.shape[1]
    BLOCK_K: gl.constexpr = bufs.type.shape[2]
    D_CHUNKS: gl.constexpr = HEAD_DIM // BLOCK_K
    STEPS: gl.constexpr = STRIDE * D_CHUNKS
    for i in range(tiles):
        for c in range(STEPS):
            n = i * STEPS + c
            s = n % DEPTH
            mbarrier.wait(empty.index(s), ((n // DEPTH) & 1) ^ 1)  # a fresh barrier passes phase 1
            mbarrier.expect(ready.index(s), ROWS * BLOCK_K * ELEMENT_BITS // 8)
            r = c // D_CHUNKS
            if PAIRED == 1:
                r = STRIDE - 1 - r
            elif PAIRED == 2:
                if 2 * r < STRIDE:
                    r = 2 * r
                else:
                    r = 2 * r - (STRIDE - 1)
            coord = [b, head, first_row + i * row_step, r, (c % D_CHUNKS) * BLOCK_K]
            _tma_load(desc, coord, ready.index(s), bufs.index(s).reshape([1, 1, ROWS, 1, BLOCK_K]))


@gluon.jit
def _consume_chunks(q_bufs, q_ready, q_empty, k_bufs, k_ready, k_empty, start, pair, STEPS: gl.constexpr,
                    LEADER: gl.constexpr, ELEMENT_BITS: gl.constexpr, MEAN: gl.constexpr, MAX: gl.constexpr,
                    D_CHUNKS: gl.constexpr):  # fmt: skip
    """One tile's reduced GEMM: ``STEPS`` chunk MMAs, each chunk's buffers
    freed as soon as its MMA is done. The leader (consumer 0) lets consumer 1
    start once it is Q_DEPTH - 2 chunks (at most the whole tile) into its first
    tile: before the Q ring, which consumer 1 has not freed yet, stops it.
    A consumer's tile of pair p is its p-th (only consumer 1's last may be
    missing), so chunk n of the Q ring is also chunk n of its K ring.

    Returns two tiles, as the Triton kernel's ``_reduced_logits``: with
    ``MEAN`` the sum of the S offsets' products first, with ``MAX`` their
    largest (an offset is ``D_CHUNKS`` chunks) second, or both when ``MEAN``
    is off; one estimate alone is returned twice."""
    QD: gl.constexpr = q_bufs.type.shape[0]
    KD: gl.constexpr = k_bufs.type.shape[0]
    START_AFTER: gl.constexpr = min(QD - 3, STEPS - 1)
    ROWS: gl.constexpr = q_bufs.type.shape[1]
    KEYS: gl.constexpr = k_bufs.type.shape[1]
    # wgmma's K step is 32 bytes: 16 bf16/fp16 or 32 fp8 elements.
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, KEYS, 256 // ELEMENT_BITS]
    )
    acc = gl.zeros([ROWS, KEYS], gl.float32, layout=mma)
    if MAX:
        best = gl.full([ROWS, KEYS], float("-inf"), gl.float32, layout=mma)
        if MEAN:
            total = gl.zeros([ROWS, KEYS], gl.float32, layout=mma)
    for c in range(STEPS):
        n = pair * STEPS + c
        mbarrier.wait(q_ready.index(n % QD), (n // QD) & 1)
        mbarrier.wait(k_ready.index(n % KD), (n // KD) & 1)
        keep = True
        if MAX:
            keep = c % D_CHUNKS != 0  # an offset's first chunk starts its product afresh
        acc = warpgroup_mma(q_bufs.index(n % QD), k_bufs.index(n % KD).permute((1, 0)), acc, use_acc=keep,
                            is_async=True)  # fmt: skip
        acc = warpgroup_mma_wait(1, deps=(acc,))  # the previous chunk's MMA is done
        mbarrier.arrive(q_empty.index((n + QD - 1) % QD), pred=c > 0)
        mbarrier.arrive(k_empty.index((n + KD - 1) % KD), pred=c > 0)
        if LEADER:
            mbarrier.arrive(start, pred=(pair == 0) & (c == START_AFTER))
        if MAX:
            # The offset's product is read once its last MMA is done; the other
            # consumer's MMAs keep the tensor cores busy meanwhile.
            if c % D_CHUNKS == D_CHUNKS - 1:
                acc = warpgroup_mma_wait(0, deps=(acc,))
                best = gl.maximum(best, acc)
                if MEAN:
                    total += acc
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(q_empty.index((pair * STEPS + STEPS - 1) % QD))
    mbarrier.arrive(k_empty.index((pair * STEPS + STEPS - 1) % KD))
    if MAX:
        if MEAN:
            return total, best
        return best, best
    return acc, acc


@gluon.jit
def _tile_softmax(
    x, m_i, l_i, scratch_rows, stride_sr, row_ids, t, j, k_first, unmasked_tiles, n_k_tiles, diag_shift,
    HAS_CAUSAL: gl.constexpr, TILES_PER_BLOCK: gl.constexpr, mma: gl.constexpr, per_row: gl.constexpr,
):  # fmt: skip
    """Key tile ``j``'s step of one estimate's online softmax (``x``: its
    logits in log2 units): parks the tile's per-key-block log2-sum-exp2 in
    ``scratch_rows`` and returns the updated row max and sum."""
    ROWS: gl.constexpr = x.shape[0]
    KEYS: gl.constexpr = x.shape[1]
    K_BLOCKS: gl.constexpr = KEYS // TILES_PER_BLOCK
    if j >= unmasked_tiles:  # crosses the causal diagonal or the last key tile
        u = k_first + j * KEYS + gl.arange(0, KEYS, layout=gl.SliceLayout(0, mma))
        visible = gl.expand_dims(u < n_k_tiles, 0)
        if HAS_CAUSAL:
            visible = visible & (gl.expand_dims(u, 0) <= gl.expand_dims(t + diag_shift, 1))
        x = gl.where(visible, x, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(x, axis=1))
    m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
    probs = gl.exp2(x - gl.expand_dims(m_ref, 1))
    block_sum = gl.sum(gl.reshape(probs, [ROWS, K_BLOCKS, TILES_PER_BLOCK]), axis=2)
    block_sum = gl.convert_layout(block_sum, per_row)
    alpha = gl.convert_layout(gl.exp2(m_i - m_ref), gl.SliceLayout(1, per_row))
    l_i = l_i * alpha + gl.sum(block_sum, axis=1)
    m_ref = gl.convert_layout(m_ref, gl.SliceLayout(1, per_row))
    block_lse = gl.expand_dims(m_ref, 1) + _fast_log2(block_sum)
    kb = k_first // TILES_PER_BLOCK + j * K_BLOCKS + gl.arange(0, K_BLOCKS, layout=gl.SliceLayout(0, per_row))
    ptrs = scratch_rows + gl.expand_dims(row_ids, 1) * stride_sr + gl.expand_dims(kb, 0)
    gl.store(ptrs, block_lse, mask=gl.expand_dims(kb < gl.cdiv(n_k_tiles, TILES_PER_BLOCK), 0))
    return m_new, l_i


@gluon.jit
def _store_row_part(m_i, l_i, row_lse_part, row_ids, per_row: gl.constexpr):
    """A consumer's part of each row's log2-sum-exp2; -inf: it saw no key."""
    m_i = gl.convert_layout(m_i, gl.SliceLayout(1, per_row))
    part = gl.where(l_i > 0, m_i + gl.log2(gl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    gl.store(row_lse_part + row_ids, part)


@gluon.jit
def _consumer_partition(
    q_bufs, q_ready, q_empty, k_bufs, k_ready, k_empty, start, scratch_rows, second_scratch, stride_sr, row_lse_part,
    second_row_lse, t0, k_first, n_tiles, unmasked_tiles, n_k_tiles, diag_shift, qk_scale, WHICH: gl.constexpr,
    STEPS: gl.constexpr, TILES_PER_BLOCK: gl.constexpr, HAS_CAUSAL: gl.constexpr, ELEMENT_BITS: gl.constexpr,
    MEAN: gl.constexpr, MAX: gl.constexpr, D_CHUNKS: gl.constexpr,
):  # fmt: skip
    """Consumer ``WHICH``: key tiles WHICH, WHICH+2, ... of the program's rows;
    the softmax as in the Triton kernel's ``_online_softmax_tile``. With
    ``MEAN`` and ``MAX`` the max's statistics go to ``second_scratch`` and
    ``second_row_lse``; ``qk_scale`` is the mean's (the max's is S times it)."""
    QD: gl.constexpr = q_bufs.type.shape[0]
    ROWS: gl.constexpr = q_bufs.type.shape[1]
    KEYS: gl.constexpr = k_bufs.type.shape[1]
    K_BLOCKS: gl.constexpr = KEYS // TILES_PER_BLOCK
    # wgmma's K step is 32 bytes: 16 bf16/fp16 or 32 fp8 elements.
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, KEYS, 256 // ELEMENT_BITS]
    )
    # Block sums are stored from a row-per-thread layout: 4-16 contiguous floats each.
    per_row: gl.constexpr = gl.BlockedLayout([1, K_BLOCKS], [32, 1], [4, 1], [1, 0])
    row_ids = gl.arange(0, ROWS, layout=gl.SliceLayout(1, per_row))
    t = t0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, mma))
    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, mma))  # running row max (log2 units)
    l_i = gl.zeros([ROWS], gl.float32, layout=gl.SliceLayout(1, per_row))  # running row sum of exp2(x - m_i)
    m_2, l_2 = m_i, l_i  # the max's, with MEAN and MAX
    OFFSETS: gl.constexpr = STEPS // D_CHUNKS  # S
    first_scale = qk_scale if MEAN else qk_scale * OFFSETS
    if WHICH == 1:
        mbarrier.wait(start, 0, pred=n_tiles > 0)  # consumer 0 has tile 0 whenever there are tiles
    for pair in range(gl.cdiv(n_tiles, 2)):
        j = 2 * pair + WHICH
        if j < n_tiles:
            first, second = _consume_chunks(
                q_bufs, q_ready, q_empty, k_bufs, k_ready, k_empty, start, pair, STEPS, WHICH == 0, ELEMENT_BITS, MEAN,
                MAX, D_CHUNKS,
            )
            m_i, l_i = _tile_softmax(
                first * first_scale, m_i, l_i, scratch_rows, stride_sr, row_ids, t, j, k_first, unmasked_tiles,
                n_k_tiles, diag_shift, HAS_CAUSAL, TILES_PER_BLOCK, mma, per_row,
            )
            if MEAN and MAX:
                m_2, l_2 = _tile_softmax(
                    second * (qk_scale * OFFSETS), m_2, l_2, second_scratch, stride_sr, row_ids, t, j,
                    k_first, unmasked_tiles, n_k_tiles, diag_shift, HAS_CAUSAL, TILES_PER_BLOCK, mma, per_row,
                )
        else:  # consumer 1 past the last tile: release the Q chunks consumer 0 used
            for c in range(STEPS):
                n = pair * STEPS + c
                mbarrier.wait(q_ready.index(n % QD), (n // QD) & 1)
                mbarrier.arrive(q_empty.index(n % QD))
    _store_row_part(m_i, l_i, row_lse_part, row_ids, per_row)
    if MEAN and MAX:
        _store_row_part(m_2, l_2, second_row_lse, row_ids, per_row)


@gluon.jit
def scores_kernel(
    q_desc, k_desc, scratch_ptr, row_lse_ptr, head_scale_ptr, stride_sh, stride_sr, stride_rh, stride_rp, num_heads,
    group_size, q_len, k_len, tile_start, diag_shift, qk_scale, STRIDE: gl.constexpr, HEAD_DIM: gl.constexpr,
    TILES_PER_BLOCK: gl.constexpr, HAS_CAUSAL: gl.constexpr, PAIRING: gl.constexpr, HAS_HEAD_SCALE: gl.constexpr,
    MEAN: gl.constexpr, MAX: gl.constexpr, BLOCK_K: gl.constexpr, Q_DEPTH: gl.constexpr,
    K_DEPTH: gl.constexpr, ROWS: gl.constexpr, KEYS: gl.constexpr, KEY_RANGE: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
):  # fmt: skip
    """One program: ``ROWS`` reduced query rows of one (batch, query head) by
    the key tiles of one ``KEY_RANGE``, up to the causal diagonal of its last row.
    ``HAS_HEAD_SCALE``: fp8 inputs, whose products are multiplied by
    ``head_scale_ptr[b * num_heads + h]`` (``fp8.head_scales``). ``MEAN``,
    ``MAX``: the estimates, as in the Triton kernel (``qk_scale`` is the
    mean's; with both, the max's statistics go to the heads
    ``num_programs(2)`` past the mean's in scratch and row_lse)."""
    D_CHUNKS: gl.constexpr = HEAD_DIM // BLOCK_K
    STEPS: gl.constexpr = STRIDE * D_CHUNKS
    ELEMENT_BITS: gl.constexpr = q_desc.dtype.primitive_bitwidth
    gl.static_assert(Q_DEPTH >= 3)  # consumer 1's head start is Q_DEPTH - 2 >= 1 chunks
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)  # heaviest (causal: last) rows first
    pid_r = gl.program_id(1)
    pid_bh = gl.program_id(2)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    n_q_tiles = gl.cdiv(q_len, STRIDE)
    n_k_tiles = gl.cdiv(k_len, STRIDE)
    t0 = tile_start + pid_m * ROWS
    k_tile_end = n_k_tiles
    unmasked_end = n_k_tiles // KEYS * KEYS
    if HAS_CAUSAL:
        last_t = gl.minimum(t0 + ROWS, n_q_tiles) - 1
        k_tile_end = gl.minimum(k_tile_end, last_t + diag_shift + 1)
        unmasked_end = gl.minimum(unmasked_end, gl.maximum(t0 + diag_shift + 1, 0) // KEYS * KEYS)
    k_first = pid_r * KEY_RANGE
    n_tiles = gl.cdiv(gl.maximum(gl.minimum(k_tile_end, k_first + KEY_RANGE) - k_first, 0), KEYS)
    if n_tiles == 0:  # a range past the rows' causal diagonal: their parts stay -inf
        return
    if HAS_HEAD_SCALE:
        qk_scale = qk_scale * gl.load(head_scale_ptr + pid_bh)

    tile_layout: gl.constexpr = gl.NVMMASharedLayout(
        swizzle_byte_width=q_desc.layout.swizzle_byte_width, element_bitwidth=ELEMENT_BITS, rank=2
    )
    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [Q_DEPTH, ROWS, BLOCK_K], tile_layout)
    k0_bufs = gl.allocate_shared_memory(k_desc.dtype, [K_DEPTH, KEYS, BLOCK_K], tile_layout)
    k1_bufs = gl.allocate_shared_memory(k_desc.dtype, [K_DEPTH, KEYS, BLOCK_K], tile_layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [Q_DEPTH, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [Q_DEPTH, 1], mbarrier.MBarrierLayout())
    k0_ready = gl.allocate_shared_memory(gl.int64, [K_DEPTH, 1], mbarrier.MBarrierLayout())
    k0_empty = gl.allocate_shared_memory(gl.int64, [K_DEPTH, 1], mbarrier.MBarrierLayout())
    k1_ready = gl.allocate_shared_memory(gl.int64, [K_DEPTH, 1], mbarrier.MBarrierLayout())
    k1_empty = gl.allocate_shared_memory(gl.int64, [K_DEPTH, 1], mbarrier.MBarrierLayout())
    start = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(Q_DEPTH):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # both consumers use every Q chunk
    for i in gl.static_range(K_DEPTH):
        mbarrier.init(k0_ready.index(i), count=1)
        mbarrier.init(k0_empty.index(i), count=1)
        mbarrier.init(k1_ready.index(i), count=1)
        mbarrier.init(k1_empty.index(i), count=1)
    mbarrier.init(start, count=1)

    scratch_rows = scratch_ptr + pid_bh.to(gl.int64) * stride_sh + (pid_m * ROWS).to(gl.int64) * stride_sr
    row_lse_part = row_lse_ptr + pid_bh.to(gl.int64) * stride_rh + 2 * pid_r * stride_rp + pid_m * ROWS
    second_scratch = scratch_rows + gl.num_programs(2).to(gl.int64) * stride_sh
    second_row_lse = row_lse_part + gl.num_programs(2).to(gl.int64) * stride_rh
    kv_head = h // group_size
    n_pairs = gl.cdiv(n_tiles, 2)
    unmasked_tiles = gl.maximum(unmasked_end - k_first, 0) // KEYS
    gl.warp_specialize(
        [
            (_consumer_partition, (q_bufs, q_ready, q_empty, k0_bufs, k0_ready, k0_empty, start, scratch_rows,
                                   second_scratch, stride_sr, row_lse_part, second_row_lse, t0, k_first, n_tiles,
                                   unmasked_tiles, n_k_tiles, diag_shift, qk_scale, 0, STEPS, TILES_PER_BLOCK,
                                   HAS_CAUSAL, ELEMENT_BITS, MEAN, MAX, D_CHUNKS)),
            (_consumer_partition, (q_bufs, q_ready, q_empty, k1_bufs, k1_ready, k1_empty, start, scratch_rows,
                                   second_scratch, stride_sr, row_lse_part + stride_rp, second_row_lse + stride_rp,
                                   t0, k_first, n_tiles, unmasked_tiles, n_k_tiles, diag_shift, qk_scale, 1, STEPS,
                                   TILES_PER_BLOCK, HAS_CAUSAL, ELEMENT_BITS, MEAN, MAX, D_CHUNKS)),
            # Q: the program's rows once per pair of key tiles; K: the even, the odd tiles.
            (_load_partition, (q_desc, q_bufs, q_ready, q_empty, b, h, t0, 0, n_pairs, PAIRING, STRIDE, HEAD_DIM,
                               ELEMENT_BITS)),
            (_load_partition, (k_desc, k0_bufs, k0_ready, k0_empty, b, kv_head, k_first, 2 * KEYS, n_pairs, 0,
                               STRIDE, HEAD_DIM, ELEMENT_BITS)),
            (_load_partition, (k_desc, k1_bufs, k1_ready, k1_empty, b, kv_head, k_first + KEYS, 2 * KEYS,
                               n_tiles // 2, 0, STRIDE, HEAD_DIM, ELEMENT_BITS)),
        ],
        [4, 1, 1, 1],
        [CONSUMER_REGS, PRODUCER_REGS, PRODUCER_REGS, PRODUCER_REGS],
    )  # fmt: skip


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, stride: int, block_visible: torch.Tensor | None) -> str | None:
    """Why this kernel cannot score the call (None: it can)."""
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "it needs a Hopper GPU (sm_90: warpgroup MMAs and TMA)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"it takes fp16/bf16 inputs, not {q.dtype}"
    if q.shape[-1] % CONFIG["BLOCK_K"]:
        return f"it needs a head dim that is a multiple of {CONFIG['BLOCK_K']}, not {q.shape[-1]}"
    if block_visible is not None:
        return "it has no block_visible mask"
    for name, x in (("q", q), ("k", k)):
        if x.stride(-1) != 1 or any(s % 8 for s in x.stride()[:-1]) or x.data_ptr() % 16:
            return f"TMA needs {name} with a contiguous last dim and 16-byte aligned rows, not strides {x.stride()}"
    return None


def whole_groups(x: torch.Tensor, stride: int) -> torch.Tensor:
    """``x`` (B, H, L, D), or for L not a multiple of ``stride`` a copy with
    zero rows appended up to one (the TMA boxes read whole groups of S rows)."""
    B, H, L, D = x.shape
    if L % stride == 0:
        return x
    out = x.new_zeros((B, H, L + (-L % stride), D))
    out[:, :, :L] = x
    return out


def kernel_config(dtype: torch.dtype, head_dim: int) -> dict[str, int]:
    """Chunk columns and ring depths: ``FP8_CONFIG`` for fp8 inputs whose
    head dim is a multiple of its ``BLOCK_K``, else ``CONFIG``."""
    if dtype.itemsize == 1 and head_dim % FP8_CONFIG["BLOCK_K"] == 0:
        return FP8_CONFIG
    return CONFIG


def _descriptor(x: torch.Tensor, stride: int, rows: int) -> TensorDescriptor:
    """``x`` (B, H, L, D) as ``[B, H, L/S, S, D]``, loaded ``rows`` reduced rows
    by ``BLOCK_K`` columns of one sub-row at a time."""
    B, H, L, D = x.shape
    sb, sh, sl, sd = x.stride()
    dtype = _GL_DTYPES[x.dtype]
    columns = kernel_config(x.dtype, D)["BLOCK_K"]
    swizzle = gl.NVMMASharedLayout.get_default_for([rows, columns], dtype).swizzle_byte_width
    layout = gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=8 * x.dtype.itemsize, rank=5)
    block = [1, 1, rows, 1, columns]
    return TensorDescriptor(x, [B, H, L // stride, stride, D], [sb, sh, stride * sl, sl, sd], block, layout)


def key_ranges(k_len: int, stride: int) -> int:
    """Key ranges of ``KEY_RANGE`` reduced rows in keys of length ``k_len``:
    each query row block's programs (the row statistics have two parts a range)."""
    return max(1, -(-k_len // (stride * KEY_RANGE)))


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    scratch: torch.Tensor,
    row_lse: torch.Tensor,
    *,
    stride: int,
    tiles_per_block: int,
    tile_start: int,
    chunk: int,
    diag_shift: int,
    qk_scale: float,
    causal: bool,
    interleaved: bool,
    reduction: Reduction = "mean",
    head_scale: torch.Tensor | None = None,
) -> None:
    """Scores reduced query rows ``[tile_start, tile_start + chunk)``: block
    log2-sum-exp2s into ``scratch`` (E*B*Hq, rows, nK), each key range's two
    consumers' row parts into ``row_lse`` (E*B*Hq, 2 * key_ranges(Lk, S),
    rows): -inf for the ranges a row does not reach; E estimates, the mean's
    first, for ``reduction`` in ``reference.REDUCTIONS``. fp8 ``q`` and ``k``
    come with ``head_scale`` (``fp8.head_scales``)."""
    validate_reduction(reduction)
    if (q.dtype == torch.float8_e4m3fn) != (head_scale is not None):
        raise ValueError(f"head_scale must be given exactly for fp8 inputs, but got q.dtype={q.dtype} and "
                         f"head_scale={'None' if head_scale is None else 'a tensor'}")  # fmt: skip
    B, Hq, Lq, D = q.shape
    # Whole key blocks a tile: 128-key tiles where a block is longer than the max's.
    keys = MAX_BLOCK_N if "max" in reduction and tiles_per_block <= MAX_BLOCK_N else BLOCK_N
    # Ranges past the chunk's last causal diagonal have no programs: their parts stay -inf.
    row_lse.fill_(float("-inf"))
    keys_reached = k.shape[2] if not causal else min(k.shape[2], (tile_start + chunk + diag_shift) * stride)
    scores_kernel[(-(-chunk // BLOCK_M), key_ranges(keys_reached, stride), B * Hq)](
        _descriptor(q, stride, BLOCK_M),
        _descriptor(k, stride, keys),
        scratch,
        row_lse,
        scratch if head_scale is None else head_scale,  # an unread pointer without scales
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
        PAIRING=2 if interleaved else 1,
        HAS_HEAD_SCALE=head_scale is not None,
        MEAN="mean" in reduction,
        MAX="max" in reduction,
        ROWS=BLOCK_M,
        KEYS=keys,
        KEY_RANGE=KEY_RANGE,
        CONSUMER_REGS=_CONSUMER_REGS,
        PRODUCER_REGS=_PRODUCER_REGS,
        num_warps=4,
        maxnreg=_MAX_REGS,
        **kernel_config(q.dtype, D),
    )
