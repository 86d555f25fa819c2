"""Block scorers and the mask/score functions that carry SDPA semantics into
FlexAttention. Leaf package: imports neither ``xflex`` nor ``xflex.passes``."""

from .antidiagonal import antidiagonal_block_scores, reduced_tile_visible
from .masks import (
    BlockVisibility,
    MaskMod,
    ScoreMod,
    additive_bias,
    boolean_mask,
    causal_block_visibility,
    causal_mask,
    tensor_block_visibility,
)

__all__ = [
    "antidiagonal_block_scores",
    "reduced_tile_visible",
    "BlockVisibility",
    "MaskMod",
    "ScoreMod",
    "additive_bias",
    "boolean_mask",
    "causal_block_visibility",
    "causal_mask",
    "tensor_block_visibility",
]
