"""Which calls run dense, and why: decided per call when it runs, from the
actual inputs and the active settings (no graph guards, no recompiles)."""

from __future__ import annotations

import torch

from .attention import SdpaArgs
from .config import Config

__all__ = ["dense_reason"]

_SPARSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dense_reason(args: SdpaArgs, config: Config, needs_grad: bool) -> str | None:
    """Why this call must run dense SDPA, or None when it can run sparse.

    Example:
        >>> q = torch.randn(1, 2, 64, 32)
        >>> dense_reason(SdpaArgs(q, q, q), Config(), needs_grad=False)
        'query length 64 below one block (128), e.g. a decode step'
    """
    query, key = args.query, args.key
    if not config.enabled:
        return "sparsity disabled"
    if query.dim() != 4 or key.dim() != 4:
        return f"query/key are {query.dim()}-D/{key.dim()}-D, sparse path takes 4-D (B, H, L, D)"
    if query.device.type not in ("cpu", "cuda"):
        return f"device {query.device.type} has no FlexAttention path"
    if query.dtype not in _SPARSE_DTYPES:
        return f"dtype {query.dtype} (sparse path takes fp16/bf16/fp32)"
    if args.dropout_p != 0.0:
        return "attention dropout"
    if needs_grad and query.device.type == "cpu":
        return "gradients on CPU (FlexAttention has no CPU backward)"
    if query.shape[2] < config.block_size:
        return f"query length {query.shape[2]} below one block ({config.block_size}), e.g. a decode step"
    if key.shape[2] < config.min_seq_len:
        return f"key length {key.shape[2]} below min_seq_len={config.min_seq_len}"
    return None
