"""One ``scaled_dot_product_attention`` call's arguments as one value, with
the checks every path shares and SDPA's own (dense) result."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

__all__ = ["SdpaArgs"]


@dataclasses.dataclass(frozen=True)
class SdpaArgs:
    """The arguments of ``F.scaled_dot_product_attention``, by name.

    Attributes:
        query: ``(B, Hq, Lq, E)``; key ``(B, Hkv, Lk, E)``; value ``(B, Hkv, Lk, Ev)``.
        attn_mask: bool (True: attend) or additive float, broadcastable to
            ``(B, Hq, Lq, Lk)``; None for none.
        dropout_p, is_causal, scale, enable_gqa: as in SDPA (``is_causal`` is
            top-left aligned when ``Lq != Lk``).

    Example:
        >>> q = k = v = torch.randn(1, 2, 256, 64)
        >>> args = SdpaArgs(q, k, v, is_causal=True)
        >>> args.validate(); args.dense().shape
        torch.Size([1, 2, 256, 64])
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None = None
    dropout_p: float = 0.0
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False

    @property
    def q_len(self) -> int:
        return self.query.shape[-2]

    @property
    def kv_len(self) -> int:
        return self.key.shape[-2]

    @property
    def softmax_scale(self) -> float:
        """``scale``, or SDPA's default ``1/sqrt(E)``."""
        return 1.0 / math.sqrt(self.query.shape[-1]) if self.scale is None else self.scale

    def dense(self) -> torch.Tensor:
        """SDPA's own result for these arguments."""
        return F.scaled_dot_product_attention(
            self.query,
            self.key,
            self.value,
            attn_mask=self.attn_mask,
            dropout_p=self.dropout_p,
            is_causal=self.is_causal,
            scale=self.scale,
            enable_gqa=self.enable_gqa,
        )

    def validate_values(self) -> None:
        """The non-tensor arguments have SDPA's types and ranges (TypeError / ValueError)."""
        if not all(isinstance(t, torch.Tensor) for t in (self.query, self.key, self.value)):
            raise TypeError("query, key and value must be tensors")
        if self.attn_mask is not None and not isinstance(self.attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be None or a tensor, but got {type(self.attn_mask).__name__}")
        if not isinstance(self.is_causal, bool) or not isinstance(self.enable_gqa, bool):
            raise TypeError(f"is_causal and enable_gqa must be bool, but got {self.is_causal!r} and {self.enable_gqa!r}")
        if not isinstance(self.dropout_p, (int, float)) or not 0.0 <= self.dropout_p <= 1.0:
            raise ValueError(f"dropout_p must be a float in [0, 1], but got {self.dropout_p!r}")
        if self.scale is not None and not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale)):
            raise ValueError(f"scale must be None or a finite float, but got {self.scale!r}")

    def validate(self) -> None:
        """Shapes, dtypes and the mask fit together as SDPA requires, for 4-D
        inputs (ValueError naming the argument and what was expected)."""
        self.validate_values()
        query, key, value = self.query, self.key, self.value
        if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
            raise ValueError(
                f"query, key and value must be 4-D (B, H, L, E), but got {query.dim()}-D, {key.dim()}-D, {value.dim()}-D"
            )
        B, Hq, Lq, E = query.shape
        if key.shape[0] != B or value.shape[0] != B:
            raise ValueError(f"query, key and value must share batch size, but got {B}, {key.shape[0]}, {value.shape[0]}")
        if key.shape[-1] != E:
            raise ValueError(f"query and key must share head dim, but got E={E} and E={key.shape[-1]}")
        if key.shape[1] != value.shape[1] or key.shape[2] != value.shape[2]:
            raise ValueError(f"key and value must share heads and length, but got key{tuple(key.shape)} and value{tuple(value.shape)}")
        Hkv = key.shape[1]
        if Hq != Hkv and not (self.enable_gqa and Hkv > 0 and Hq % Hkv == 0):
            raise ValueError(
                f"query heads must equal key heads, or be a multiple of them with enable_gqa=True, "
                f"but got Hq={Hq}, Hkv={Hkv}, enable_gqa={self.enable_gqa}"
            )
        if not (query.dtype == key.dtype == value.dtype):
            raise ValueError(f"query, key and value must share dtype, but got {query.dtype}, {key.dtype}, {value.dtype}")
        if self.attn_mask is not None:
            mask = self.attn_mask
            if self.is_causal:
                raise ValueError("attn_mask must be None when is_causal=True (as in scaled_dot_product_attention)")
            try:
                torch.broadcast_shapes(mask.shape, (B, Hq, Lq, key.shape[2]))
            except RuntimeError:
                raise ValueError(
                    f"attn_mask of shape {tuple(mask.shape)} does not broadcast to (B, Hq, Lq, Lk)={(B, Hq, Lq, key.shape[2])}"
                ) from None
            if mask.dtype != torch.bool and not mask.is_floating_point():
                raise ValueError(f"attn_mask must be bool or floating point, but got {mask.dtype}")
