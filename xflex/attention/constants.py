"""Small constant tensors on a device, made once: copying a Python list to a
GPU waits for the work already queued there, so a per-call ``torch.tensor(...,
device="cuda")`` would stall every call's launches."""

from __future__ import annotations

from functools import lru_cache

import torch

__all__ = ["device_constant"]


@lru_cache(maxsize=256)
def device_constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device``, cached: callers only read it.

    Example:
        >>> device_constant((0.5, 1.0), torch.device("cpu"))
        tensor([0.5000, 1.0000])
    """
    return torch.tensor(values, dtype=dtype, device=device)
