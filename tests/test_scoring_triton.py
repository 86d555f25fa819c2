"""The fused Triton antidiagonal scorer against the plain-torch reference
(ragged lengths, Lq != Lk, GQA, dtypes, head dims). Without CUDA the kernel runs in Triton's CPU
interpreter on fp32/fp16 inputs (its bf16 ``tl.dot`` is wrong); the GPU class
checks realistic sizes in bf16."""

import math
import os
import sys

import pytest
import torch

_CUDA = torch.cuda.is_available()
_TRITON_IMPORTED_EARLIER = "triton" in sys.modules
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton (and the kernel module) is imported
triton = pytest.importorskip("triton", reason="triton is an optional dependency (pip install 'xflex[triton]')")
if not _CUDA and _TRITON_IMPORTED_EARLIER and type(triton.language.zeros).__name__ != "InterpretedFunction":
    pytest.skip(
        "triton was imported in compiled mode before this module could switch its CPU interpreter on; "
        "run with TRITON_INTERPRET=1 in the environment",
        allow_module_level=True,
    )

from hypothesis import given, settings, strategies as st  # noqa: E402

from xflex.attention.masks import causal_block_visibility  # noqa: E402
from xflex.attention.scoring import antidiagonal_block_scores, score_blocks  # noqa: E402
from xflex.attention.scoring import triton_kernel  # noqa: E402
from xflex.attention.scoring.triton_kernel import antidiagonal_block_scores_triton  # noqa: E402
from xflex.attention.selection import forced_blocks, select_blocks  # noqa: E402

# The kernel takes log2(0) = -inf for blocks without mass; numpy warns in the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")

_DEVICE = torch.device("cuda" if _CUDA else "cpu")
_KERNEL = triton_kernel.scores_kernel
# 128x256 unflattened, one of the two configs that win from 16K up
# (bench/RESULTS.md): on a GPU every test but the per-config one runs only it,
# so a shape costs one compile, not seven compiles and a timing sweep.
_PINNED_CONFIG = next(
    c
    for c in triton_kernel.CONFIGS
    if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["FLATTEN"]) == (128, 256, False)
)
# The small cases run fp32 in the interpreter and fp16 on a GPU: the tensor-core
# path models run (fp32's FMA path, TestOnGPU.test_other_dtypes, compiles for
# minutes at the pinned tile). Only summation order and exp2/log2 differ; a
# GPU's MMA sums in another order than the reference's matmul.
_SMALL_DTYPE = torch.float16 if _CUDA else torch.float32
_TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-4, 1e-5), torch.bfloat16: (1e-4, 1e-5)}


def _use_configs(monkeypatch, configs):
    monkeypatch.setattr(_KERNEL, "configs", configs)
    monkeypatch.setattr(_KERNEL, "cache", {})  # best config per key, from the old list


@pytest.fixture(autouse=True)
def _triton_kernel_with_pinned_config(monkeypatch):
    if _CUDA:  # the interpreter already runs one config (the smallest)
        _use_configs(monkeypatch, [_PINNED_CONFIG])


def _inputs(batch, hq, hkv, q_len, kv_len, head_dim, *, seed=0, dtype=_SMALL_DTYPE):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, q_len, head_dim, generator=gen)
    k = torch.randn(batch, hkv, kv_len, head_dim, generator=gen)
    return q.to(_DEVICE, dtype), k.to(_DEVICE, dtype)


def _random_blocks(shape, *, seed=0, density=0.6):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen) < density).to(_DEVICE)


def _assert_matches_reference(q, k, *, rtol=None, atol=None, key_ranges=None, **kwargs):
    # key_ranges is the kernel's own parameter; the rest (pairing included) both take.
    got = antidiagonal_block_scores_triton(q, k, key_ranges=key_ranges, **kwargs)
    want = antidiagonal_block_scores(q, k, **kwargs)
    diff = (got - want).abs()
    print(f"max diff {diff.max().item():.3g}, mean diff {diff.mean().item():.3g}")
    default_rtol, default_atol = _TOLERANCE[q.dtype]
    rtol, atol = (default_rtol if rtol is None else rtol), (default_atol if atol is None else atol)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    return got, want


@st.composite
def _scoring_case(draw):
    stride = draw(st.sampled_from([4, 8, 16]))
    block_size = draw(st.sampled_from([64, 128]))
    hkv = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2, 4]))
    batch = draw(st.sampled_from([1, 2]))
    q_len = draw(st.integers(1, 600))
    kv_len = draw(st.integers(1, 600))
    head_dim = draw(st.sampled_from([16, 64]))
    causal = draw(st.sampled_from(["none", "top_left", "bottom_right"]))
    offset = {"none": None, "top_left": 0, "bottom_right": kv_len - q_len}[causal]
    mask_dims = draw(st.sampled_from([None, (batch, hkv * groups), (1, hkv * groups), (batch, 1), (1, 1)]))
    return stride, block_size, hkv, groups, batch, q_len, kv_len, head_dim, offset, mask_dims


def _assert_case_matches_reference(case, seed, *, kv_len=None, **kwargs):
    """One drawn case (``kv_len`` overrides the drawn length, bottom-right
    alignment kept) against the reference."""
    stride, block_size, hkv, groups, batch, q_len, drawn_kv_len, head_dim, offset, mask_dims = case
    if kv_len is None:
        kv_len = drawn_kv_len
    elif offset not in (None, 0):
        offset = kv_len - q_len
    q, k = _inputs(batch, hkv * groups, hkv, q_len, kv_len, head_dim, seed=seed)
    block_visible = None
    if mask_dims is not None:
        blocks = (math.ceil(q_len / block_size), math.ceil(kv_len / block_size))
        block_visible = _random_blocks((*mask_dims, *blocks), seed=seed)
    _assert_matches_reference(
        q, k, stride=stride, block_size=block_size, scale=0.3, causal_offset=offset, block_visible=block_visible, **kwargs
    )


@settings(max_examples=25, deadline=None, derandomize=True)
@given(_scoring_case(), st.integers(0, 2**31 - 1))
def test_matches_reference(case, seed):
    _assert_case_matches_reference(case, seed)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(_scoring_case(), st.integers(2, 9), st.sampled_from(["antidiagonal", "interleaved"]), st.integers(0, 2**31 - 1))
def test_keys_split_over_programs_match_reference(case, key_ranges, pairing, seed):
    """Rows whose keys are split over several programs (what few probe rows
    get on a GPU), including ranges past the causal diagonal or the last key
    tile that see nothing, with either pairing: the same scores as the reference."""
    # Enough key tiles for several ranges of the interpreter's 64-tile steps.
    _assert_case_matches_reference(case, seed, kv_len=1500 + seed % 700, key_ranges=key_ranges, pairing=pairing)


@pytest.mark.parametrize("stride", [2, 4, 8, 16])
@pytest.mark.parametrize("causal_offset", [None, 0, 217])
def test_interleaved_pairing_matches_reference(stride, causal_offset):
    """The interleaved pairing on ragged GQA rows (the last query tile short,
    so the pairing's masked rows differ from the antidiagonal's)."""
    q, k = _inputs(2, 4, 2, 300 + 3, 517, 64, seed=stride)
    _assert_matches_reference(q, k, stride=stride, block_size=64, causal_offset=causal_offset, pairing="interleaved")


@pytest.mark.parametrize("reduction", ["max", "mean+max"])
@pytest.mark.parametrize("head_dim", [16, 80, 128])  # one, five and two reduction chunks per offset
@pytest.mark.parametrize("causal_offset", [None, 517 - 303])
def test_max_reductions_match_reference(reduction, head_dim, causal_offset):
    """The max of each tile's products on ragged GQA rows, alone or with the
    mean from the same pass (``"mean+max"``): every chunk of an offset's
    product summed before the max."""
    q, k = _inputs(2, 4, 2, 303, 517, head_dim, seed=head_dim)
    _assert_matches_reference(q, k, stride=8, block_size=64, causal_offset=causal_offset, pairing="interleaved", reduction=reduction)


@pytest.mark.parametrize("reduction", ["max", "mean+max"])
def test_max_reductions_with_block_mask_and_split_keys(reduction):
    q, k = _inputs(1, 4, 2, 200, 1600, 64, seed=3)
    block_visible = _random_blocks((1, 4, 4, 25), seed=3)
    _assert_matches_reference(q, k, stride=4, block_size=64, block_visible=block_visible, key_ranges=3, reduction=reduction)


@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
@pytest.mark.parametrize("q_len,kv_len", [(97, 97), (300, 517), (517, 300), (1, 600), (129, 128), (600, 37)])
def test_ragged_lengths(q_len, kv_len, causal):
    q, k = _inputs(1, 2, 1, q_len, kv_len, 16)
    offset = {"none": None, "top_left": 0, "bottom_right": kv_len - q_len}[causal]
    _assert_matches_reference(q, k, stride=8, block_size=64, causal_offset=offset)


@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("stride", [4, 8, 16])
def test_strides_and_block_sizes(stride, block_size):
    q, k = _inputs(1, 2, 2, 333, 411, 64)
    _assert_matches_reference(q, k, stride=stride, block_size=block_size, causal_offset=411 - 333)


def test_most_tiles_per_block():
    """Bs/S = 128 reduced tiles per block: one block per program."""
    q, k = _inputs(1, 1, 1, 333, 300, 16)
    _assert_matches_reference(q, k, stride=2, block_size=256, causal_offset=0)


@pytest.mark.parametrize("causal_offset", [None, 0])
def test_many_key_blocks(causal_offset):
    """150 key blocks: the normalisation pass takes several steps."""
    q, k = _inputs(1, 2, 1, 300, 600, 16)
    _assert_matches_reference(q, k, stride=4, block_size=4, causal_offset=causal_offset)


@pytest.mark.parametrize("config", triton_kernel.CONFIGS, ids=str)
def test_every_config(config, monkeypatch):
    """Each config the autotuner may pick, on a ragged GQA query chunk (bf16
    on a GPU; the interpreter's bf16 dot is wrong, so fp32 on the CPU)."""
    _use_configs(monkeypatch, [config])
    q, k = _inputs(2, 4, 2, 1000 + 7, 2000 + 29, 64, dtype=torch.bfloat16 if _CUDA else torch.float32)
    _assert_matches_reference(q, k, stride=8, block_size=128, causal_offset=(2000 + 29) - (1000 + 7))
    assert _KERNEL.best_config is config


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_gqa_and_batch(groups):
    q, k = _inputs(2, 2 * groups, 2, 250, 250, 16, seed=groups)
    _assert_matches_reference(q, k, stride=8, block_size=64, causal_offset=0)


@pytest.mark.parametrize("head_dim", [16, 40, 48, 64])
def test_head_dims(head_dim):
    """40 is walked in one masked 64-wide step, 48 in three unmasked 16-wide steps."""
    q, k = _inputs(1, 1, 1, 200, 200, head_dim)
    _assert_matches_reference(q, k, stride=8, block_size=64)


@pytest.mark.parametrize("head_dim", [16, 40])
@pytest.mark.parametrize("causal_offset", [None, 0, 7])
def test_whole_programs_then_ragged_ones(head_dim, causal_offset):
    """The interpreter's 64x64 tiles at S=4: two programs of whole query rows
    and a ragged last one; the last key tile (reduced row 127) is ragged."""
    q, k = _inputs(1, 2, 1, 2 * 64 * 4 + 3, 2 * 64 * 4 - 1, head_dim)
    _assert_matches_reference(q, k, stride=4, block_size=64, causal_offset=causal_offset)


@pytest.mark.parametrize("causal_offset", [None, 0])
@pytest.mark.parametrize("mask_dims", [(2, 4), (1, 4), (2, 1), (1, 1)])
def test_block_visible_broadcasts(mask_dims, causal_offset):
    q, k = _inputs(2, 4, 2, 300, 300, 16)
    block_visible = _random_blocks((*mask_dims, 5, 5), seed=sum(mask_dims))
    _assert_matches_reference(q, k, stride=4, block_size=64, causal_offset=causal_offset, block_visible=block_visible)


@pytest.mark.parametrize("causal_offset", [None, 0, 37])
@pytest.mark.parametrize("masked", [False, True])
def test_row_max_grows_across_key_tiles(causal_offset, masked):
    """Logits that rise along the keys move every row's running max at each of
    several unmasked key tiles (275 reduced columns, 64-wide tiles here), so
    the block masses parked earlier must be rescaled; rows past the query end
    share the last program with real rows."""
    q, k = _inputs(1, 2, 1, 1050, 1100, 16, seed=3)
    k = k * torch.linspace(0.2, 3.0, k.shape[2], device=_DEVICE, dtype=k.dtype)[:, None]
    block_visible = _random_blocks((1, 2, 17, 18), seed=1, density=0.8) if masked else None
    _assert_matches_reference(q, k, stride=4, block_size=64, causal_offset=causal_offset, block_visible=block_visible)


def test_rows_that_see_nothing_score_zero():
    q, k = _inputs(1, 2, 1, 256, 256, 16)
    block_visible = torch.ones(1, 1, 4, 4, dtype=torch.bool, device=_DEVICE)
    block_visible[..., 1, :] = False
    got, _ = _assert_matches_reference(q, k, stride=8, block_size=64, causal_offset=-100, block_visible=block_visible)
    assert (got[..., :2, :] == 0).all()  # query blocks 0 (before the diagonal) and 1 (masked)


def test_non_contiguous_inputs():
    q, k = _inputs(2, 4, 2, 230, 190, 64)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, L, H, D) storage
    k_strided = torch.stack([k, torch.zeros_like(k)], -1)[..., 0]  # stride 2 along D
    assert not q_t.is_contiguous() and k_strided.stride(-1) == 2
    torch.testing.assert_close(k_strided, k)
    _assert_matches_reference(q_t, k_strided, stride=8, block_size=64, causal_offset=0)


def test_half_precision_inputs():
    q, k = _inputs(1, 2, 1, 300, 300, 64, dtype=torch.float16)
    _assert_matches_reference(q, k, stride=8, block_size=128, causal_offset=0)


def test_query_chunks_share_one_scratch(monkeypatch):
    """A scratch budget below one chunk forces one launch per 128 query tiles."""
    monkeypatch.setattr(triton_kernel, "_SCRATCH_BYTES", 1)
    q, k = _inputs(1, 2, 1, 590, 600, 16)
    _assert_matches_reference(q, k, stride=4, block_size=64, causal_offset=10)


def test_empty_inputs():
    q, k = _inputs(1, 2, 1, 0, 100, 16)
    assert antidiagonal_block_scores_triton(q, k, stride=8, block_size=64).shape == (1, 2, 0, 2)
    q, k = _inputs(1, 2, 1, 100, 0, 16)
    assert antidiagonal_block_scores_triton(q, k, stride=8, block_size=64).shape == (1, 2, 2, 0)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(k_dtype=torch.float64), "dtype"),
        (dict(block_size=96), "block_size // stride"),
        (dict(block_visible=torch.ones(1, 1, 2, 3, dtype=torch.bool)), "block_visible"),
        (dict(block_visible=torch.ones(1, 1, 2, 2)), "block_visible"),
        (dict(block_visible=torch.ones(3, 1, 2, 2, dtype=torch.bool)), "block_visible"),
        (dict(scale=float("nan")), "scale"),
        (dict(hq=3), "query heads"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(backend="gluon"), "backend='gluon' cannot score these inputs"),
    ],
)
def test_invalid_arguments_raise(change, message):
    q, k = _inputs(1, change.get("hq", 2), 2, 100, 100, 16)
    k = k.to(change.get("k_dtype", k.dtype))
    visible = change.get("block_visible")
    kwargs = dict(stride=8, block_size=change.get("block_size", 64), scale=change.get("scale"))
    kwargs["backend"] = change.get("backend", "triton")
    with pytest.raises(ValueError, match=message):
        score_blocks(q, k, block_visible=None if visible is None else visible.to(_DEVICE), **kwargs)


def _assert_near_greedy(selected, scores, *, visible, forced, tau, tol):
    """``selected`` is XAttention's selection of ``scores`` up to near-ties within
    ``tol``: forced blocks kept, no kept free block outscored by a dropped one,
    the kept mass reaches tau, and dropping the weakest kept free block would
    fall short of it."""
    visible, forced = visible.expand_as(scores), forced.expand_as(scores) & visible.expand_as(scores)
    assert not (selected & ~visible).any() and (selected | ~forced).all()
    mass = scores.masked_fill(~visible, 0.0)
    free_kept, dropped = selected & ~forced, visible & ~selected
    weakest_kept = mass.masked_fill(~free_kept, float("inf")).amin(-1)
    strongest_dropped = mass.masked_fill(~dropped, float("-inf")).amax(-1)
    kept, total = mass.masked_fill(~selected, 0.0).sum(-1), mass.sum(-1)
    mass_tol = tol * scores.shape[-1]
    assert (strongest_dropped <= weakest_kept + tol).all(), "a dropped block outscores a kept one beyond a near-tie"
    assert (kept >= tau * total - mass_tol).all(), "kept mass short of tau"
    assert ((kept - weakest_kept < tau * total + mass_tol) | ~free_kept.any(-1)).all(), "selection not minimal"


def _check_selection(got, want, *, q_len, kv_len, block_size, causal_offset, tau=0.9):
    """Selections from kernel and reference scores differ only at near-ties."""
    if causal_offset is None:
        visible = torch.ones_like(want[:1, :1], dtype=torch.bool)
    else:
        visible = causal_block_visibility(q_len, kv_len, block_size, causal_offset, want.device).any
    forced = forced_blocks(
        q_len,
        kv_len,
        block_size,
        diagonal_offset=causal_offset,
        keep_sink=causal_offset is not None,
        keep_recent=0,
        device=want.device,
    )
    from_kernel = select_blocks(got, visible=visible, forced=forced, threshold=tau)
    from_reference = select_blocks(want, visible=visible, forced=forced, threshold=tau)
    tol = 2 * (got - want).abs().max().item() + 1e-6
    print(f"blocks selected differently: {(from_kernel ^ from_reference).sum().item()} of {from_reference.numel()}")
    _assert_near_greedy(from_kernel, want, visible=visible, forced=forced, tau=tau, tol=tol)


def test_selection_differs_only_at_near_ties():
    q, k = _inputs(1, 4, 2, 600, 600, 64, seed=7)
    q = q + k.repeat_interleave(2, 1).roll(3, 2)  # local (slash) structure: peaky rows
    got, want = _assert_matches_reference(q, k, stride=8, block_size=64, causal_offset=0)
    _check_selection(got, want, q_len=600, kv_len=600, block_size=64, causal_offset=0)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="realistic sizes need a CUDA GPU (the interpreter would take hours)")
class TestOnGPU:
    """bf16 at LLM sizes; the tolerance is twice the reference's own error from
    rounding its inputs to bf16 (FlashAttention's rule)."""

    L = 8192 + 37

    def _bf16_case(self, causal, seed=0):
        q, k = _inputs(1, 8, 2, self.L, self.L, 128, seed=seed, dtype=torch.float32)
        return q, k, (0 if causal else None)

    @pytest.mark.parametrize("causal", [True, False])
    @pytest.mark.parametrize("stride", [8, 16])
    def test_bf16_within_reference_rounding_error(self, stride, causal):
        q, k, offset = self._bf16_case(causal)
        kwargs = dict(stride=stride, block_size=128, causal_offset=offset)
        exact = antidiagonal_block_scores(q, k, **kwargs)
        rounded = antidiagonal_block_scores(q.bfloat16(), k.bfloat16(), **kwargs)
        got = antidiagonal_block_scores_triton(q.bfloat16(), k.bfloat16(), **kwargs)
        ref_err = (rounded - exact).abs().max().item()
        err = (got - exact).abs().max().item()
        print(f"kernel error {err:.3g}, reference error on bf16 inputs {ref_err:.3g}")
        assert err <= 2 * ref_err + 1e-5
        # Against the reference on the very same bf16 inputs only summation order differs.
        torch.testing.assert_close(got, rounded, rtol=1e-4, atol=1e-5)

    @pytest.mark.parametrize("reduction", ["max", "mean+max"])
    def test_max_reductions_bf16(self, reduction):
        q, k, offset = self._bf16_case(causal=True, seed=1)
        kwargs = dict(stride=8, block_size=128, causal_offset=offset, pairing="interleaved", reduction=reduction)
        got = antidiagonal_block_scores_triton(q.bfloat16(), k.bfloat16(), **kwargs)
        torch.testing.assert_close(got, antidiagonal_block_scores(q.bfloat16(), k.bfloat16(), **kwargs), rtol=1e-4, atol=1e-5)

    @pytest.mark.parametrize("masked", [True, False])
    def test_chunked_prefill_and_block_mask_bf16(self, masked):
        """A query chunk after a KV prefix (bottom-right causal), or a
        block-masked bidirectional call, on the same bf16 inputs as the reference."""
        q_len, kv_len = 2048 + 5, self.L
        q, k = _inputs(2, 8, 2, q_len, kv_len, 128, dtype=torch.bfloat16)
        block_visible = _random_blocks((2, 1, math.ceil(q_len / 128), math.ceil(kv_len / 128))) if masked else None
        offset = None if masked else kv_len - q_len
        _assert_matches_reference(
            q, k, stride=8, block_size=128, rtol=1e-4, atol=1e-5, causal_offset=offset, block_visible=block_visible
        )

    @pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
    def test_other_dtypes(self, dtype):
        q, k = _inputs(2, 4, 4, 3000 + 5, 4000 + 11, 64, dtype=dtype)
        _assert_matches_reference(q, k, stride=8, block_size=64, rtol=1e-4, atol=1e-5, causal_offset=4000 + 11 - 3005)

    def test_non_contiguous_bf16(self):
        q, k, offset = self._bf16_case(True)
        q, k = q.bfloat16(), k.bfloat16()
        q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
        k_t = k.transpose(1, 2).contiguous().transpose(1, 2)
        got = antidiagonal_block_scores_triton(q_t, k_t, stride=16, block_size=128, causal_offset=offset)
        want = antidiagonal_block_scores_triton(q, k, stride=16, block_size=128, causal_offset=offset)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("causal", [True, False])
    def test_selection_differs_only_at_near_ties(self, causal):
        q, k, offset = self._bf16_case(causal, seed=1)
        q, k = q.bfloat16(), k.bfloat16()
        kwargs = dict(stride=16, block_size=128, causal_offset=offset)
        got = antidiagonal_block_scores_triton(q, k, **kwargs)
        want = antidiagonal_block_scores(q, k, **kwargs)
        _check_selection(got, want, q_len=self.L, kv_len=self.L, block_size=128, causal_offset=offset)
