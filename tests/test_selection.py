"""Threshold selection properties: tau >= 1 keeps every visible block,
raising tau never drops a block, every row keeps at least tau of its mass,
forced blocks are always kept, no invisible block ever is."""

import torch
from hypothesis import given, settings, strategies as st

from xflex.attention.masks import causal_block_visibility
from xflex.attention.selection import forced_blocks, select_blocks, to_kv_blocks


@st.composite
def selection_case(draw):
    n_q = draw(st.integers(1, 9))
    n_k = draw(st.integers(1, 9))
    heads = draw(st.integers(1, 3))
    batch = draw(st.integers(1, 2))
    causal = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    tau = draw(st.floats(0.05, 1.0))
    return n_q, n_k, heads, batch, causal, seed, tau


def _inputs(n_q, n_k, heads, batch, causal, seed, block_size=16):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, heads, n_q, n_k, generator=gen) ** 4  # peaky, with near-zeros
    q_len, kv_len = n_q * block_size - 3, n_k * block_size - 5
    q_len, kv_len = max(q_len, 1), max(kv_len, 1)
    if causal:
        visible = causal_block_visibility(q_len, kv_len, block_size, 0, torch.device("cpu")).any
        diagonal = 0
    else:
        visible = torch.ones(1, 1, n_q, n_k, dtype=torch.bool)
        diagonal = None
    forced = forced_blocks(q_len, kv_len, block_size, diagonal_offset=diagonal, keep_sink=causal, keep_recent=0, device="cpu")
    return scores, visible, forced[..., : visible.shape[-2], : visible.shape[-1]]


@settings(max_examples=200, deadline=None)
@given(selection_case())
def test_kept_mass_reaches_tau_and_forced_blocks_stay(case):
    n_q, n_k, heads, batch, causal, seed, tau = case
    scores, visible, forced = _inputs(n_q, n_k, heads, batch, causal, seed)
    selected = select_blocks(scores, visible=visible, forced=forced, threshold=tau)
    mass = scores.masked_fill(~visible, 0)
    kept = (mass * selected).sum(-1)
    assert (kept >= tau * mass.sum(-1) * (1 - 1e-6)).all()
    assert not (selected & ~visible).any(), "a block above the causal edge was kept"
    assert (selected | ~(forced & visible)).all(), "a forced block (sink/diagonal) was dropped"


@settings(max_examples=200, deadline=None)
@given(selection_case())
def test_selection_is_the_shortest_prefix(case):
    """Dropping the lowest-scoring kept free block would fall below tau."""
    n_q, n_k, heads, batch, causal, seed, tau = case
    scores, visible, forced = _inputs(n_q, n_k, heads, batch, causal, seed)
    if tau >= 1:
        return
    selected = select_blocks(scores, visible=visible, forced=forced, threshold=tau)
    mass = scores.masked_fill(~visible, 0)
    free_kept = selected & ~(forced & visible)
    smallest = mass.masked_fill(~free_kept, float("inf")).min(-1).values
    has_free = free_kept.any(-1)
    without = (mass * selected).sum(-1) - smallest
    assert (without[has_free] < tau * mass.sum(-1)[has_free] * (1 + 1e-6)).all()


@settings(max_examples=200, deadline=None)
@given(selection_case(), st.floats(0.0, 1.0))
def test_raising_tau_never_removes_a_block(case, bump):
    n_q, n_k, heads, batch, causal, seed, tau = case
    scores, visible, forced = _inputs(n_q, n_k, heads, batch, causal, seed)
    low = select_blocks(scores, visible=visible, forced=forced, threshold=tau)
    high = select_blocks(scores, visible=visible, forced=forced, threshold=min(1.0, tau + bump))
    assert not (low & ~high).any()


@settings(max_examples=100, deadline=None)
@given(selection_case())
def test_tau_one_keeps_every_visible_block(case):
    n_q, n_k, heads, batch, causal, seed, _ = case
    scores, visible, forced = _inputs(n_q, n_k, heads, batch, causal, seed)
    selected = select_blocks(scores, visible=visible, forced=forced, threshold=1.0)
    assert torch.equal(selected, visible.expand_as(selected))


def test_per_head_thresholds():
    scores = torch.tensor([[0.7, 0.2, 0.1]]).expand(2, 1, 3).reshape(1, 2, 1, 3)
    none = torch.zeros_like(scores, dtype=torch.bool)
    tau = torch.tensor([0.5, 0.85]).view(1, 2, 1, 1)
    selected = select_blocks(scores, visible=~none, forced=none, threshold=tau)
    assert selected.tolist() == [[[[True, False, False]], [[True, True, False]]]]


def test_forced_blocks_sink_diagonal_and_recent():
    forced = forced_blocks(256, 256, 64, diagonal_offset=0, keep_sink=True, keep_recent=64, device="cpu")[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(forced, expected)
    # Bottom-right (KV prefix): queries 0..63 sit at key positions 192..255.
    forced = forced_blocks(64, 256, 64, diagonal_offset=192, keep_sink=False, keep_recent=0, device="cpu")[0, 0]
    assert forced.tolist() == [[False, False, False, True]]


def test_to_kv_blocks_orders_selected_blocks_first():
    selected = torch.tensor([[[[False, True, False, True], [True, False, False, False]]]])
    num, idx = to_kv_blocks(selected)
    assert num.tolist() == [[[2, 1]]]
    assert idx[0, 0, 0, :2].tolist() == [1, 3] and idx[0, 0, 1, 0].item() == 0
    assert num.dtype == idx.dtype == torch.int32


def test_row_chunking_changes_nothing(monkeypatch):
    from xflex.attention.selection import reference

    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 3, 37, 29, generator=gen) ** 4
    visible, forced = torch.rand(1, 1, 37, 29, generator=gen) > 0.2, torch.rand(1, 1, 37, 29, generator=gen) > 0.9
    whole = select_blocks(scores, visible=visible, forced=forced, threshold=0.7)
    whole_kv = to_kv_blocks(whole)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 100)  # 1 row of 2*3*29 per chunk
    chunked = select_blocks(scores, visible=visible, forced=forced, threshold=0.7)
    assert torch.equal(whole, chunked)
    assert all(torch.equal(a, b) for a, b in zip(whole_kv, to_kv_blocks(chunked)))
