"""Small attention models written for the tests: the shapes and call forms
real models use (GQA, HF-style repeat_kv + bool masks, bidirectional)."""

from __future__ import annotations

from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """Hugging Face's K/V head repetition before SDPA."""
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class Attention(nn.Module):
    """One attention layer. ``form``: "causal" (is_causal, native GQA),
    "bidirectional", or "hf_mask" (explicit causal bool mask + repeat_kv)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, form: str):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.form = heads, kv_heads, dim // heads, form
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(B, L, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.form == "causal":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif self.form == "bidirectional":
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            n = self.heads // self.kv_heads
            out = F.scaled_dot_product_attention(q, repeat_kv(k, n), repeat_kv(v, n), attn_mask=mask)
        return x + self.o(out.transpose(1, 2).reshape(B, L, -1))


class TinyTransformer(nn.Module):
    """Three attention layers, one of each form, with a padding-aware causal mask."""

    def __init__(self, dim: int = 64, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(
            Attention(dim, heads, kv_heads, form) for form in ("causal", "bidirectional", "hf_mask")
        )

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        mask = causal[None, None] & padding[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x


def count_xattn_compiles() -> mock._patch:
    """Patch that counts graphs the ``xattn`` backend compiles (``.call_count``);
    dynamo's own counters also count FlexAttention's inner compiles."""
    import xflex.backend

    return mock.patch.object(xflex.backend, "rewrite_sdpa", wraps=xflex.backend.rewrite_sdpa)


def tiny_llm_config(layers: int) -> dict:
    """A small Llama-family config (GQA, 2 query heads per KV head) as keyword
    arguments for transformers' config classes."""
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
