"""FP8 scoring inputs (``xflex.attention.scoring.fp8``) against plain-torch
e4m3 rounding, and ``precision="fp8"`` through ``score_blocks`` and the
config. The Gluon kernel's fp8 products are checked on Hopper in
test_scoring_gluon.py."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

import xflex
from xflex import planning
from xflex.attention.scoring import antidiagonal_block_scores, score_blocks
from xflex.attention.scoring.fp8 import E4M3_MAX, dequantize, fp8_per_head, head_scales


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    st.lists(st.floats(-6, 4), min_size=1, max_size=3),  # log10 of each head's magnitude
    st.integers(1, 70),
    st.integers(0, 2**31 - 1),
)
def test_rounding_is_e4m3_of_a_power_of_two_scale(dtype, log_magnitudes, length, seed):
    gen = torch.Generator().manual_seed(seed)
    magnitudes = torch.tensor([10.0**m for m in log_magnitudes])
    if dtype == torch.float16:
        magnitudes = magnitudes.clamp(1e-3, 1e4)  # within fp16's range
    x = (torch.randn(2, len(log_magnitudes), length, 8, generator=gen) * magnitudes[:, None, None]).to(dtype)
    x8, inverse = fp8_per_head(x)
    assert x8.dtype == torch.float8_e4m3fn and inverse.shape == (2, len(log_magnitudes))
    assert torch.equal(inverse, torch.exp2(torch.log2(inverse).round()))  # powers of two
    scaled = x.double() / inverse.double()[..., None, None]
    amax = scaled.abs().amax(dim=(-2, -1))
    assert (amax <= E4M3_MAX).all() and (amax > E4M3_MAX / 2).all()  # nothing saturates, no range wasted
    # Plain-torch e4m3 rounding of the same scaled values, read back exactly.
    expected = scaled.float().to(torch.float8_e4m3fn).double() * inverse.double()[..., None, None]
    assert torch.equal(dequantize(x8, inverse, torch.float64), expected)
    if dtype != torch.float16:  # exact in the inputs' own dtype
        assert torch.equal(dequantize(x8, inverse, dtype).double(), expected)
    normal = scaled.abs() >= 2.0**-6  # e4m3's smallest normal: 3 mantissa bits from there up
    relative = ((expected - x.double()).abs() / x.double().abs())[normal]
    assert relative.numel() == 0 or relative.max() <= 2.0**-4


def test_zero_head_and_head_scales():
    x = torch.zeros(1, 2, 16, 8)
    x[:, 1] = 3.0
    x8, inverse = fp8_per_head(x)
    assert inverse.tolist() == [[1.0, 2.0**-7]]  # 3 * 2^7 = 384 <= 448 < 768
    assert torch.equal(dequantize(x8, inverse, torch.float32), x)
    q_inverse = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    k_inverse = torch.tensor([[0.5, 0.25]])  # GQA: query heads 0-1 share kv head 0
    assert head_scales(q_inverse, k_inverse).tolist() == [0.5, 1.0, 1.0, 2.0]


def test_fp8_rounding_moves_the_estimate_little():
    # What the Gluon scorer computes under precision="fp8" (tests/test_scoring_gluon.py),
    # here in plain torch: rows are probability sums, and rounding moves them by a few percent at most.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 520, 64, generator=gen) * torch.tensor([0.1, 1.0, 2.0, 4.0])[:, None, None]
    k = torch.randn(1, 2, 600, 64, generator=gen)
    kwargs = dict(stride=8, block_size=128, causal_offset=80, pairing="interleaved")
    (q8, q_inv), (k8, k_inv) = fp8_per_head(q), fp8_per_head(k)
    rounded = antidiagonal_block_scores(dequantize(q8, q_inv, torch.float32), dequantize(k8, k_inv, torch.float32), **kwargs)
    plain = antidiagonal_block_scores(q, k, **kwargs)
    assert 0 < (rounded - plain).abs().max() < 0.05 * plain.amax()
    # Scorers without fp8 products take the inputs as given.
    assert torch.equal(score_blocks(q, k, precision="fp8", backend="torch", **kwargs), score_blocks(q, k, backend="torch", **kwargs))


def test_precision_option_is_validated_and_reaches_the_scorer(monkeypatch):
    with pytest.raises(ValueError, match="scoring_precision.*one of"):
        xflex.Config(scoring_precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        score_blocks(torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8), stride=8, block_size=64, precision="e5m2")
    seen = []

    def recording(*args, precision, **kwargs):
        seen.append(precision)
        return score_blocks(*args, precision=precision, **kwargs)

    monkeypatch.setattr(planning, "score_blocks", recording)
    x = torch.randn(1, 2, 512, 16)
    config = xflex.Config(block_size=64, min_seq_len=0, dense_row_blocks=0, break_even=False)
    xflex.plan(x, x, is_causal=True, config=dataclasses.replace(config, scoring_precision="fp8"))
    with xflex.sparsity(scoring_precision="fp8"):
        xflex.sparse_sdpa(x, x, x, is_causal=True, config=config)
    xflex.sparse_sdpa(x, x, x, is_causal=True, config=config)
    assert seen == ["fp8", "fp8", "input"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused rounding kernel runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_triton_rounding_equals_torch_rounding(dtype, head_dim):
    from xflex.attention.scoring.fp8_kernel import round_to_e4m3

    gen = torch.Generator().manual_seed(head_dim)
    x = torch.randn(2, 700, 3, head_dim, generator=gen) * torch.tensor([1e-3, 1.0, 300.0])[:, None]
    x = x.to(dtype).cuda().transpose(1, 2)  # (B, H, L, D) strides, as attention layers pass q and k
    x8, inverse = fp8_per_head(x)
    expected = (x.cpu().double() / inverse.cpu().double()[..., None, None]).float().to(torch.float8_e4m3fn)
    assert torch.equal(round_to_e4m3(x, 1 / inverse).cpu().view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(x8.cpu().view(torch.uint8), expected.view(torch.uint8))
