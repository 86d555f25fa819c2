"""What one attention call runs, stage by stage (tensors in, tensors out; this
package imports nothing of the rest of xflex but ``xflex.torch_internals``):

    sdpa_args   the call's arguments, validated      -> SdpaArgs
    pattern     what its mask means at block level   -> CallPattern (masks: mask_mod / score_mod)
    scoring     strided block-score estimate         -> (B, Hq, nQ, nK) fp32
    selection   threshold cut + forced blocks        -> KVBlocks
    block_mask  FlexAttention's BlockMask            -> BlockMask
    flex        compiled FlexAttention               -> output
                (cpu_buckets: the same at padded lengths, so the CPU
                compiles one kernel per power-of-two bucket)

``oracle`` holds the exact attention mass a selection is judged by. Each stage
with kernels has a plain-torch ``reference`` beside them, picked by
``backend`` (see ``backends``)."""

from .backends import BACKENDS, Backend
from .block_mask import build_block_mask
from .cpu_buckets import bucket_length, bucketed_flex_attention
from .flex import (
    ATTENTION_KERNELS,
    AttentionKernel,
    KernelName,
    attention_kernel,
    check_block_size,
    flex_attention_backward,
    run_flex_attention,
)
from .masks import BlockVisibility, MaskMod, ScoreMod
from .oracle import exact_block_mass, oracle_block_counts, sample_query_blocks, sampled_block_mass
from .pattern import CallPattern, call_pattern
from .scoring import score_blocks, scoring_backend
from .sdpa_args import SdpaArgs
from .selection import KVBlocks, as_kv_blocks, forced_blocks, select_blocks, select_kv_blocks, text_token_blocks

__all__ = [
    "ATTENTION_KERNELS",
    "AttentionKernel",
    "KernelName",
    "BACKENDS",
    "Backend",
    "BlockVisibility",
    "CallPattern",
    "KVBlocks",
    "MaskMod",
    "ScoreMod",
    "SdpaArgs",
    "as_kv_blocks",
    "bucket_length",
    "bucketed_flex_attention",
    "attention_kernel",
    "check_block_size",
    "build_block_mask",
    "call_pattern",
    "exact_block_mass",
    "flex_attention_backward",
    "forced_blocks",
    "oracle_block_counts",
    "run_flex_attention",
    "sample_query_blocks",
    "sampled_block_mass",
    "score_blocks",
    "scoring_backend",
    "select_blocks",
    "select_kv_blocks",
    "text_token_blocks",
]
