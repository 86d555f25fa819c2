"""The Gluon (Hopper) antidiagonal scorer against the plain-torch reference,
and the dispatch between it and the Triton kernel. Needs a Hopper GPU: Gluon
has no CPU interpreter (bench/tools/test_sass_report.py compiles it without one)."""

import math
from unittest import mock

import pytest
import torch

if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9):
    pytest.skip("the Gluon scorer runs on Hopper GPUs (sm_90) only", allow_module_level=True)
pytest.importorskip("triton.experimental.gluon", reason="needs a Triton with Gluon")

from hypothesis import given, settings, strategies as st  # noqa: E402

from xflex.attention.scoring import REDUCTIONS, antidiagonal_block_scores, gluon_kernel, score_blocks, scoring_backend  # noqa: E402
from xflex.attention.scoring.fp8 import dequantize, fp8_per_head  # noqa: E402
from xflex.attention.scoring import triton_kernel  # noqa: E402
from xflex.attention.scoring.triton_kernel import antidiagonal_block_scores_triton  # noqa: E402

pytestmark = pytest.mark.gpu


def _inputs(batch, hq, hkv, q_len, kv_len, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, q_len, head_dim, generator=gen)
    k = torch.randn(batch, hkv, kv_len, head_dim, generator=gen)
    return q.cuda().to(dtype), k.cuda().to(dtype)


def _assert_matches_reference(q, k, **kwargs):
    """Same bf16/fp16 inputs as the reference: only summation order (and
    lg2.approx) differ, as for the Triton kernel's GPU tests."""
    got = antidiagonal_block_scores_triton(q, k, use_gluon=True, **kwargs)
    want = antidiagonal_block_scores(q, k, **kwargs)
    print(f"max diff {(got - want).abs().max().item():.3g}")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    return got


@st.composite
def _case(draw):
    stride = draw(st.sampled_from([4, 8, 16]))
    block_size = draw(st.sampled_from([64, 128]))
    hkv, groups, batch = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 4])), draw(st.sampled_from([1, 2]))
    # Ragged lengths (not multiples of S: scored on zero-padded copies) and whole groups of S.
    q_len, kv_len = (draw(st.one_of(st.integers(1, 5600), st.integers(1, 700).map(lambda n: stride * n))) for _ in "qk")
    head_dim = draw(st.sampled_from([64, 128]))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16]))
    causal = draw(st.sampled_from([None, 0, kv_len - q_len]))
    # Reduced key rows a program takes: the shipped range is one program per
    # row block at these lengths; 256 (one pair of key tiles) splits rows into many.
    key_range = draw(st.sampled_from([256, 512, gluon_kernel.KEY_RANGE]))
    pairing = draw(st.sampled_from(["antidiagonal", "interleaved"]))
    reduction = draw(st.sampled_from(REDUCTIONS))
    return stride, block_size, hkv, groups, batch, q_len, kv_len, head_dim, dtype, causal, key_range, pairing, reduction


@settings(max_examples=50, deadline=None, derandomize=True)
@given(_case(), st.integers(0, 2**31 - 1))
def test_matches_reference(case, seed):
    stride, block_size, hkv, groups, batch, q_len, kv_len, head_dim, dtype, causal, key_range, pairing, reduction = case
    q, k = _inputs(batch, hkv * groups, hkv, q_len, kv_len, head_dim, dtype, seed)
    with mock.patch.object(gluon_kernel, "KEY_RANGE", key_range):
        _assert_matches_reference(
            q, k, stride=stride, block_size=block_size, scale=0.3, causal_offset=causal, pairing=pairing,
            reduction=reduction,
        )  # fmt: skip


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("key_range", [256, gluon_kernel.KEY_RANGE])
@pytest.mark.parametrize("causal_offset", [None, 0])
def test_many_key_tiles_and_chunks(causal_offset, key_range, reduction, monkeypatch):
    # 16K tokens at S=8: 2048 reduced key rows, one key range or eight; a
    # small scratch budget makes several query chunks (tile_start > 0, each
    # reaching more ranges under the causal mask) share one scratch and row_lse.
    monkeypatch.setattr(triton_kernel, "_SCRATCH_BYTES", 2**20)
    monkeypatch.setattr(gluon_kernel, "KEY_RANGE", key_range)
    q, k = _inputs(1, 8, 2, 16384, 16384, 128, torch.bfloat16)
    _assert_matches_reference(q, k, stride=8, block_size=128, causal_offset=causal_offset, reduction=reduction)


def test_max_where_a_block_is_longer_than_its_tiles():
    # S=1, Bs=128: a key block is 128 reduced rows, more than the max's
    # 64-key tiles, so it takes the mean's 128-key tiles.
    q, k = _inputs(1, 2, 1, 2000, 2000, 64, torch.bfloat16)
    _assert_matches_reference(q, k, stride=1, block_size=128, causal_offset=0, reduction="max")


def test_head_dim_256_and_odd_tile_count():
    # D=256: four chunks a sub-row; 5 key tiles: consumer 1 idles on the last pair.
    q, k = _inputs(1, 2, 1, 640 * 8, 640 * 8, 256, torch.bfloat16)
    _assert_matches_reference(q, k, stride=8, block_size=128, causal_offset=0)


def test_non_contiguous_inputs():
    # (B, L, H, D) memory seen as (B, H, L, D), as attention layers pass q and k.
    q, k = _inputs(2, 8, 2, 4096, 4096, 128, torch.bfloat16)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_t = k.transpose(1, 2).contiguous().transpose(1, 2)
    got = _assert_matches_reference(q_t, k_t, stride=8, block_size=128, causal_offset=0)
    torch.testing.assert_close(got, antidiagonal_block_scores_triton(q, k, stride=8, block_size=128, causal_offset=0))


def test_auto_takes_gluon_for_long_calls_only():
    # Short calls are launch-bound, where the Triton kernel's launch is cheaper.
    long = torch.empty(1, 1, 65536, 128, dtype=torch.bfloat16, device="cuda").expand(1, 32, -1, -1)
    assert scoring_backend(long, long, stride=8) == "gluon"
    short = long[:, :, :8192]
    assert scoring_backend(short, short, stride=8) == "triton"
    assert scoring_backend(short, short, stride=8, backend="gluon") == "gluon"


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(dtype=torch.float32), "fp16/bf16"),
        (dict(head_dim=80), "multiple of 64"),
        (dict(block_visible=True), "block_visible"),
    ],
)
def test_falls_back_to_triton_where_it_cannot_run(change, reason):
    args = dict(q_len=4096, head_dim=128, dtype=torch.bfloat16) | change
    block_visible = args.pop("block_visible", None)
    q, k = _inputs(1, 4, 4, args["q_len"], 4096, args["head_dim"], args["dtype"])
    if block_visible:
        block_visible = torch.ones(1, 1, math.ceil(q.shape[2] / 128), 32, dtype=torch.bool, device="cuda")
    assert scoring_backend(q, k, stride=8, block_visible=block_visible) == "triton"
    with pytest.raises(ValueError, match=reason):
        scoring_backend(q, k, stride=8, block_visible=block_visible, backend="gluon")


@st.composite
def _fp8_case(draw):
    stride = draw(st.sampled_from([8, 16]))
    hkv, groups, batch = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 4])), draw(st.sampled_from([1, 2]))
    q_len, kv_len = draw(st.integers(1, 4800)), draw(st.integers(1, 4800))  # ragged: zero-padded copies
    head_dim = draw(st.sampled_from([64, 128]))  # fp8 chunks of 64 and of 128 columns
    causal = draw(st.sampled_from([None, 0, kv_len - q_len]))
    pairing = draw(st.sampled_from(["antidiagonal", "interleaved"]))
    reduction = draw(st.sampled_from(REDUCTIONS))
    return stride, hkv, groups, batch, q_len, kv_len, head_dim, causal, pairing, reduction


@settings(max_examples=25, deadline=None, derandomize=True)
@given(_fp8_case(), st.integers(0, 2**31 - 1))
def test_fp8_matches_reference_of_rounded_inputs(case, seed):
    # Query heads 0.03 to 3 in magnitude, key heads 1.6 to 0.6: each needs its
    # own scale (a scale read for the wrong head moves logits by powers of
    # two), with logits of standard deviation up to ~6, as attention's are.
    stride, hkv, groups, batch, q_len, kv_len, head_dim, causal, pairing, reduction = case
    q, k = _inputs(batch, hkv * groups, hkv, q_len, kv_len, head_dim, torch.bfloat16, seed)
    q = q * torch.logspace(-1.5, 0.5, q.shape[1], device="cuda", dtype=q.dtype)[:, None, None]
    k = k * torch.logspace(0.2, -0.2, k.shape[1], device="cuda", dtype=k.dtype)[:, None, None]
    kwargs = dict(stride=stride, block_size=128, scale=0.3, causal_offset=causal, pairing=pairing, reduction=reduction)
    got = score_blocks(q, k, precision="fp8", backend="gluon", **kwargs)
    (q8, q_inv), (k8, k_inv) = fp8_per_head(q), fp8_per_head(k)
    want = antidiagonal_block_scores(dequantize(q8, q_inv, torch.float32), dequantize(k8, k_inv, torch.float32), **kwargs)
    unrounded = antidiagonal_block_scores(q, k, **kwargs)
    print(f"max diff {(got - want).abs().max().item():.3g}, rounding moved {(unrounded - want).abs().max().item():.3g}")
    # Hopper's fp8 MMAs accumulate in reduced precision (logit errors grow with
    # the logits), so looser than bf16's 1e-4; a row sums to 8-16 here.
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2)
