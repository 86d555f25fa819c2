"""The fused Triton selection kernel against the torch selection ops (the
reference): the same blocks and the same FlexAttention layout, exactly.

Scores are multiples of 1/1024 below 4, so every fp32 sum the two take is
exact whatever its order (the GPU's scans add in another order than torch):
any difference is a rule difference, not rounding. Many scores tie, which
checks the tie-break (lower block index first) too. Without CUDA the kernel
runs in Triton's CPU interpreter.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

pytest.importorskip("triton", reason="triton is an optional dependency (pip install 'xflex[triton]')")

from xflex.attention.masks import causal_block_visibility  # noqa: E402
from xflex.attention.selection import forced_blocks, select_kv_blocks  # noqa: E402

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dyadic_scores(shape, gen):
    return (torch.randint(0, 64, shape, generator=gen) ** 2 / 1024).float()


def _assert_same_as_torch(scores, **kwargs):
    got = select_kv_blocks(scores.to(_DEVICE), backend="triton", **{k: _to_device(v) for k, v in kwargs.items()})
    want = select_kv_blocks(scores, backend="torch", **kwargs)
    for name, g, w in zip(want._fields, got, want):
        assert torch.equal(g.cpu(), w), f"{name} differs from the torch selection"
    return want


def _to_device(t):
    return t.to(_DEVICE) if isinstance(t, torch.Tensor) else t


@st.composite
def _case(draw):
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n_q, n_k = draw(st.integers(1, 9)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    taus = draw(st.lists(st.sampled_from([0.05, 0.3, 0.5, 0.9, 0.95, 0.999, 1.0]), min_size=heads, max_size=heads))
    causal = draw(st.booleans())
    mask = draw(st.sampled_from(["causal", "random", "none"]))
    full = draw(st.sampled_from(["visibility", "none"]))
    added = draw(st.booleans())
    return batch, heads, n_q, n_k, seed, taus, causal, mask, full, added


# The interpreter runs each example ~1 s on the CPU: fewer there, all on a GPU.
@settings(max_examples=40 if torch.cuda.is_available() else 16, deadline=None, derandomize=True)
@given(_case())
def test_matches_torch_selection(case):
    batch, heads, n_q, n_k, seed, taus, causal, mask, full, added = case
    gen = torch.Generator().manual_seed(seed)
    block = 16
    q_len, kv_len = n_q * block - 3 if n_q > 1 else 5, n_k * block - 5 if n_k > 1 else 7
    scores = _dyadic_scores((batch, heads, n_q, n_k), gen)
    if mask == "causal":
        visibility = causal_block_visibility(q_len, kv_len, block, kv_len - q_len if causal else 0, torch.device("cpu"))
        visible, fully_visible = visibility.any, visibility.all
    elif mask == "random":  # per (batch, head), like a tensor mask's block view
        visible = torch.rand(batch, heads, n_q, n_k, generator=gen) < 0.7
        fully_visible = visible & (torch.rand(batch, heads, n_q, n_k, generator=gen) < 0.5)
    else:
        visible = fully_visible = torch.ones(1, 1, n_q, n_k, dtype=torch.bool)
    forced = forced_blocks(
        q_len, kv_len, block, diagonal_offset=kv_len - q_len if causal else None, keep_sink=causal, keep_recent=0, device="cpu"
    )
    _assert_same_as_torch(
        scores,
        visible=visible,
        fully_visible=fully_visible if full == "visibility" else None,
        forced=forced,
        threshold=torch.tensor(taus).view(1, heads, 1, 1),
        # Whole key-block columns per (batch, head), as vertical lines are.
        added=torch.rand(batch, heads, 1, n_k, generator=gen) < 0.2 if added else None,
    )


def test_empty_scores():
    scores = torch.zeros(1, 2, 0, 3)
    yes = torch.ones(1, 1, 0, 3, dtype=torch.bool)
    _assert_same_as_torch(scores, visible=yes, fully_visible=yes, forced=~yes, threshold=torch.full((1, 1, 1, 1), 0.9))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="full-size rows need the GPU")
@pytest.mark.parametrize("heads, n_blocks", [(32, 256), (32, 1024), (4, 2048)])
def test_full_size_causal_rows_on_gpu(heads, n_blocks):
    """32K/128K/256K tokens at block 128: the op's causal case, one scalar tau."""
    gen = torch.Generator().manual_seed(n_blocks)
    length = n_blocks * 128
    visibility = causal_block_visibility(length, length, 128, 0, torch.device("cpu"))
    forced = forced_blocks(length, length, 128, diagonal_offset=0, keep_sink=True, keep_recent=0, device="cpu")
    selected = _assert_same_as_torch(
        _dyadic_scores((1, heads, n_blocks, n_blocks), gen),
        visible=visibility.any,
        fully_visible=visibility.all,
        forced=forced,
        threshold=torch.full((1, 1, 1, 1), 0.9),
    ).selected
    assert 0 < selected.sum() < visibility.any.sum() * heads
