"""The run-time op against plain-torch attention with the selected blocks
applied, for every mask form SDPA takes."""


import pytest
import torch
import torch.nn.functional as F
from reference import attention_ref, blocks_to_elements, causal_visible

import xflex

BLOCK = 64
CUDA_BLOCK = 128  # FlexAttention's GPU kernels take multiples of 128 (attention.flex.check_block_size)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _alibi(heads, q_len, kv_len):
    slopes = 2.0 ** (-torch.arange(1, heads + 1) / heads)
    distance = (torch.arange(kv_len)[None, :] - torch.arange(q_len)[:, None]).float()
    return (slopes[:, None, None] * distance)[None]


def make_case(kind, batch, hq, hkv, q_len, kv_len, dtype=torch.float32, seed=0, device="cpu"):
    """Inputs (on ``device``) and the element-wise meaning (on the CPU) of one
    SDPA call kind."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, q_len, 32, generator=gen).to(dtype)
    k = torch.randn(batch, hkv, kv_len, 32, generator=gen).to(dtype)
    v = torch.randn(batch, hkv, kv_len, 32, generator=gen).to(dtype)
    mask, is_causal, bias = None, False, None
    visible = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool)
    if kind == "causal":
        is_causal, visible = True, causal_visible(q_len, kv_len)
    elif kind == "padding":  # HF-style left padding + bottom-right causal, as a bool mask
        pad = torch.tensor([0, 70])[:batch, None]
        keys = torch.arange(kv_len)[None, :] >= pad
        mask = (causal_visible(q_len, kv_len, kv_len - q_len)[0] & keys[:, None, None, :]).expand(batch, 1, q_len, kv_len)
        visible = mask
    elif kind == "bias":  # ALiBi with a -inf band: additive float mask
        bias = _alibi(hq, q_len, kv_len).expand(batch, hq, q_len, kv_len).clone()
        bias[..., : kv_len // 3] = float("-inf")
        bias[..., : BLOCK // 2, :] = _alibi(hq, BLOCK // 2, kv_len)  # keep every row non-empty
        mask = bias.to(dtype)
        visible = bias != float("-inf")
        bias = mask.masked_fill(~visible, 0.0)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(q), move(k), move(v), move(mask), is_causal, visible, bias


CASES = [
    # kind, batch, hq, hkv, q_len, kv_len
    ("causal", 1, 4, 2, 300, 300),
    ("causal", 2, 2, 2, 200, 333),  # query shorter than keys, top-left
    ("causal", 1, 4, 1, 333, 200),  # query longer than keys
    ("none", 2, 4, 4, 257, 257),
    ("none", 1, 2, 1, 130, 390),  # cross-attention
    ("padding", 2, 4, 2, 250, 250),
    ("padding", 2, 2, 2, 140, 330),  # chunked prefill: KV prefix, bottom-right
    ("bias", 1, 4, 4, 260, 260),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,batch,hq,hkv,q_len,kv_len", CASES)
@pytest.mark.parametrize("threshold", [1.0, 0.6])
def test_sparse_output_equals_masked_dense_reference(kind, batch, hq, hkv, q_len, kv_len, threshold, device):
    block = BLOCK if device == "cpu" else CUDA_BLOCK
    # The GPU's larger block sees the same block layout (ragged ends included) at scaled lengths.
    q_len, kv_len = q_len * block // BLOCK, kv_len * block // BLOCK
    q, k, v, mask, is_causal, visible, bias = make_case(kind, batch, hq, hkv, q_len, kv_len, device=device)
    config = xflex.Config(block_size=block, min_seq_len=block, dense_row_blocks=0, stride=8, threshold=threshold)
    with xflex.sparsity() as stats:
        out = xflex.sparse_sdpa(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=hq != hkv, config=config)
    assert stats.dense_calls == [], stats.dense_calls[0].dense_reason
    selected = xflex.plan(q, k, mask, is_causal, config=config).selected
    kept = visible & blocks_to_elements(selected.cpu(), q_len, kv_len, block)
    ref = attention_ref(q.cpu(), k.cpu(), v.cpu(), visible=kept.cpu(), bias=bias)
    out = out.cpu()
    diff = (out.double() - ref).abs()
    print(f"density={stats.density:.3f} max={diff.max():.2e} mean={diff.mean():.2e}")
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=hq != hkv).cpu()
    rows = visible.expand(batch, hq, q_len, kv_len).any(-1, keepdim=True)  # SDPA's own choice on empty rows
    # torch's own fp32 error against the float64 reference of the dense call:
    # on a GPU its kernels' summation order alone reaches a few 1e-5.
    sdpa_err = ((sdpa - attention_ref(q.cpu(), k.cpu(), v.cpu(), visible=visible.cpu(), bias=bias)) * rows).abs().max().item()
    tolerance = 2e-5 if device == "cpu" else max(2e-5, 2 * sdpa_err)
    torch.testing.assert_close(out.double(), ref, rtol=tolerance, atol=tolerance)
    if threshold == 1.0:
        assert stats.density == 1.0
        # Within twice torch's own fp32 error against the float64 reference.
        assert ((out.double() - sdpa.double()) * rows).abs().max().item() <= 2 * sdpa_err + 2e-5
    else:
        assert stats.density < 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_stays_within_torchs_own(dtype):
    """Tolerance from PyTorch's own low-precision error (FlashAttention's rule)."""
    q, k, v, mask, is_causal, visible, _ = make_case("causal", 1, 4, 2, 300, 300, dtype=dtype)
    config = xflex.Config(block_size=BLOCK, min_seq_len=BLOCK, dense_row_blocks=0, threshold=1.0)
    out = xflex.sparse_sdpa(q, k, v, is_causal=True, enable_gqa=True, config=config)
    ref = attention_ref(q, k, v, visible=visible)
    sdpa_err = (F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).double() - ref).abs().max()
    err = (out.double() - ref).abs().max()
    print(f"xflex err={err:.2e} torch sdpa err={sdpa_err:.2e}")
    assert err <= 2 * sdpa_err + 1e-6


def test_rows_that_see_nothing_give_zeros_on_cpu():
    """Fully masked query rows: SDPA on CPU returns zeros there, and so does xflex."""
    q, k, v = (torch.randn(1, 2, 256, 32) for _ in range(3))
    mask = torch.ones(1, 1, 256, 256, dtype=torch.bool)
    mask[..., :100, :] = False
    config = xflex.Config(block_size=BLOCK, min_seq_len=BLOCK, dense_row_blocks=0, threshold=0.5)
    out = xflex.sparse_sdpa(q, k, v, attn_mask=mask, config=config)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[..., :100, :], torch.zeros_like(out[..., :100, :]))
    assert torch.equal(sdpa[..., :100, :], out[..., :100, :])


def test_fully_masked_blocks_are_never_computed_nor_visible():
    """A sliding window mask: blocks outside it are not visible, so even at
    threshold 1.0 the call computes only the window's blocks."""
    L, window = 512, 100
    q, k, v = (torch.randn(1, 2, L, 32) for _ in range(3))
    pos = torch.arange(L)
    mask = ((pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < window))[None, None]
    config = xflex.Config(block_size=BLOCK, min_seq_len=BLOCK, dense_row_blocks=0, threshold=1.0)
    with xflex.sparsity() as stats:
        out = xflex.sparse_sdpa(q, k, v, attn_mask=mask, config=config)
    record = stats.records[0]
    # Query block i sees keys (64i - 99, 64i + 63]: blocks i-2..i, so
    # 1 + 2 + 3 * 6 = 21 of the causal triangle's 36 blocks.
    assert record.visible_blocks.tolist() == [21, 21]
    assert record.selected_blocks.tolist() == [21, 21]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-5, atol=1e-5)


def test_dense_fallbacks_are_recorded_with_reasons():
    q, k, v = (torch.randn(1, 2, 100, 32) for _ in range(3))
    with xflex.sparsity() as stats:
        out = xflex.sparse_sdpa(q, k, v, is_causal=True, config=xflex.Config(block_size=BLOCK, min_seq_len=1024, dense_row_blocks=0))
        xflex.sparse_sdpa(q[:, :, :1], k, v, config=xflex.Config(block_size=BLOCK, min_seq_len=0, dense_row_blocks=0))
        with xflex.sparsity(enabled=False):
            xflex.sparse_sdpa(q, k, v, config=xflex.Config(block_size=BLOCK, min_seq_len=0, dense_row_blocks=0))
    reasons = [r.dense_reason for r in stats.records]
    assert "min_seq_len" in reasons[0] and "below one block" in reasons[1] and reasons[2] == "sparsity disabled"
    assert stats.density is None
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
