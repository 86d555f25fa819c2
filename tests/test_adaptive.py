"""The adaptive method and the pieces it stands on, each against a plain
reference of the same rule: the threshold rule on probe rows (one sort for
every threshold) against ``select_blocks`` run threshold by threshold, exact
block masses against explicit softmax rows, partial scoring against full
scoring, and the method's output against attention restricted to its blocks."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from reference import attention_ref, blocks_to_elements, causal_visible

import xflex
from xflex.attention import call_pattern, exact_block_mass, oracle_block_counts, sampled_block_mass, select_blocks
from xflex.attention.selection.probes import cheapest_reaching, probe_query_blocks, threshold_rule_on_probes
from xflex.planning import call_scores, probe_density

THRESHOLDS = torch.tensor([0.3, 0.5, 0.8, 0.9, 0.99, 1.0])


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    rows=st.integers(1, 4),
    n_k=st.integers(1, 9),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_threshold_rule_on_probes_equals_select_blocks_at_every_threshold(batch, heads, rows, n_k, ties, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, rows, n_k)
    scores = torch.rand(shape, generator=gen)
    if ties:  # equal scores: the order among them must match select_blocks' stable sort
        scores = (scores * 3).round() / 3
    mass = torch.rand(shape, generator=gen)
    visible = torch.rand(1, 1, rows, n_k, generator=gen) > 0.2
    forced = torch.rand(1, 1, rows, n_k, generator=gen) > 0.8
    mass = (mass * visible).div((mass * visible).sum(-1, keepdim=True).clamp_min(1e-9))
    recall, kept = threshold_rule_on_probes(scores, mass, visible=visible, forced=forced, thresholds=THRESHOLDS)
    for i, tau in enumerate(THRESHOLDS.tolist()):
        selected = select_blocks(scores, visible=visible, forced=forced, threshold=tau)
        torch.testing.assert_close(kept[i], selected.sum(-1))
        torch.testing.assert_close(recall[i], (mass * selected).sum(-1), rtol=1e-5, atol=1e-6)


def test_cheapest_reaching_and_probe_blocks():
    recall = torch.tensor([[0.7, 0.99], [0.96, 0.99], [1.0, 1.0]])
    cost = torch.tensor([[0.1, 0.1], [0.3, 0.2], [1.0, 1.0]])
    assert cheapest_reaching(recall, cost, torch.tensor([0.95, 0.95])).tolist() == [1, 0]
    assert cheapest_reaching(recall, cost, torch.tensor([1.5, 0.5])).tolist() == [2, 0]  # unreachable: best recall
    assert probe_query_blocks(12, 4, causal=True) == [8, 9, 10, 11]
    assert probe_query_blocks(12, 4, causal=False) == [0, 4, 7, 11]
    assert probe_query_blocks(2, 4, causal=True) == [0, 1]


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")  # interpreter: log2(0)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rows_per_block", [None, 5])
@pytest.mark.parametrize("causal, blocks", [(True, [5, 6]), (True, [1, 4]), (False, [0, 3, 6])])
def test_exact_block_mass_equals_explicit_softmax(causal, blocks, rows_per_block, backend):
    """Exact per-block attention mass of a few query blocks (all their rows,
    or 5 evenly spaced ones ending at the block's last) against explicit
    softmax rows; the last block (6) is ragged."""
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is an optional dependency")
    gen = torch.Generator().manual_seed(len(blocks))
    q, k = torch.randn(2, 2, 400, 16, generator=gen), torch.randn(2, 1, 400, 16, generator=gen)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"  # else the interpreter
    got = exact_block_mass(q.to(device), k.to(device), None, causal, 0.3, 64, blocks, rows_per_block=rows_per_block,
                           backend=backend).cpu()  # fmt: skip
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    if causal:
        logits = logits.masked_fill(~causal_visible(400, 400), float("-inf"))
    probs = F.pad(torch.softmax(logits, -1), (0, 448 - 400)).view(2, 2, 400, 7, 64).sum(-1)

    def block_rows(b):
        lo, hi = b * 64, min(400, (b + 1) * 64)
        n = rows_per_block or hi - lo
        return [lo + (i + 1) * (hi - lo) // n - 1 for i in range(n)]

    want = torch.stack([probs[:, :, block_rows(b)].mean(2) for b in blocks], 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        sampled_block_mass(q, k, None, causal, 0.3, 64, blocks, rows_per_block=rows_per_block), want, rtol=1e-5, atol=1e-6
    )


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")  # interpreter: log2(0)
@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 3]),
    q_len=st.integers(1, 300),
    kv_len=st.integers(1, 300),
    head_dim=st.sampled_from([16, 24, 64]),
    block_size=st.sampled_from([32, 64]),
    causal=st.booleans(),
    n_rows=st.integers(1, 70),
    seed=st.integers(0, 2**16),
)
def test_row_block_mass_kernel_equals_explicit_softmax(
    batch, kv_heads, group, q_len, kv_len, head_dim, block_size, causal, n_rows, seed
):
    """The probe kernel on any rows (unsorted, repeated, more than one
    program's 64), GQA, ragged key blocks, D not a power of two, Lq != Lk."""
    pytest.importorskip("triton", reason="triton is an optional dependency")
    from xflex.attention.oracle_kernel import row_block_mass_triton

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, q_len, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen) * 2
    rows = torch.randint(0, q_len, (n_rows,), generator=gen, dtype=torch.int32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    got = row_block_mass_triton(q.to(device), k.to(device), rows.to(device), is_causal=causal, scale=0.2,
                                block_size=block_size).cpu()  # fmt: skip
    logits = q[:, :, rows.long()] @ k.repeat_interleave(group, 1).transpose(-1, -2) * 0.2
    if causal:
        logits = logits.masked_fill(torch.arange(kv_len) > rows[:, None], float("-inf"))
    n_k = math.ceil(kv_len / block_size)
    probs = torch.softmax(logits, -1).nan_to_num(0.0)
    want = F.pad(probs, (0, n_k * block_size - kv_len)).unflatten(-1, (n_k, block_size)).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("causal, blocks", [(True, [5, 6, 7]), (True, [0, 2, 3, 7]), (False, [1, 4])])
def test_scoring_some_query_blocks_equals_those_rows_of_full_scoring(causal, blocks):
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 1000, 32, generator=gen), torch.randn(1, 2, 1000, 32, generator=gen)
    config = xflex.Config(block_size=128)
    pattern = call_pattern(q, k, None, causal, 128)
    full = call_scores(q, k, pattern, config)
    torch.testing.assert_close(call_scores(q, k, pattern, config, q_blocks=blocks), full[:, :, blocks], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA"))])
@pytest.mark.parametrize("mask, blocks", [("causal", [5, 6, 7]), ("causal", None), ("none", [1, 4]), ("per_head", [0, 3])])
def test_scoring_at_several_temperatures_at_once_equals_scoring_each(mask, blocks, device):
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 1000, 32, generator=gen).to(device), torch.randn(2, 2, 1000, 32, generator=gen).to(device)
    attn_mask = (torch.rand(1, 4, 1000, 1000, generator=gen) > 0.3).to(device) if mask == "per_head" else None
    pattern = call_pattern(q, k, attn_mask, mask == "causal", 128)
    config = xflex.Config(block_size=128)
    got = call_scores(q, k, pattern, config, 0.2, q_blocks=blocks, temperatures=(1.0, 2.0, 4.0))
    want = torch.stack([call_scores(q * t, k, pattern, config, 0.2, q_blocks=blocks) for t in (1.0, 2.0, 4.0)])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("causal, heads, kv_heads, threshold", [(True, 4, 2, 0.5), (False, 4, 4, 0.4), (True, 2, 1, (0.3, 0.9))])
def test_probe_density_is_the_selection_density_on_the_probe_rows(causal, heads, kv_heads, threshold):
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, heads, 1000, 32, generator=gen), torch.randn(1, kv_heads, 1000, 32, generator=gen)
    # The forecast leaves out the vertical and slash lines (probe_density's docstring): compare without them.
    config = xflex.Config(block_size=64, threshold=threshold, probe_blocks=3, dense_row_blocks=0, vertical_mass=0.0, slash_mass=0.0)
    pattern = call_pattern(q, k, None, causal, 64)
    full = xflex.plan(q, k, is_causal=causal, config=config)
    rows = probe_query_blocks(16, 3, causal=causal)
    want = (full.selected[:, :, rows].sum() / full.visible[:, :, rows].sum()).item()
    assert probe_density(q, k, pattern, config) == pytest.approx(want, abs=1e-6)
    assert 0.0 < want < 1.0


def test_oracle_takes_one_threshold_per_row():
    mass = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]])
    assert oracle_block_counts(mass, torch.tensor([0.5, 1.0])).tolist() == [1, 2]
    assert oracle_block_counts(mass, 0.8).tolist() == [2, 2]


def _spiky(length=1024, heads=4, seed=0):
    """Hot keys the antidiagonal mean dilutes: a few keys every query attends to."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, length, 32, generator=gen) for _ in range(3))
    hot = torch.randint(0, length, (6,), generator=gen)
    direction = F.normalize(torch.randn(32, generator=gen), dim=0)
    k[:, :, hot] += 6 * direction
    q += 2 * direction
    return q, k, v


@pytest.mark.parametrize("causal", [True, False])
def test_adaptive_output_equals_attention_over_its_blocks_and_reaches_its_target_on_probes(causal):
    q, k, v = _spiky()
    config = xflex.Config(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=0.9, method="adaptive")
    with xflex.sparsity() as stats:
        out = xflex.sparse_sdpa(q, k, v, is_causal=causal, config=config)
    plan = xflex.plan(q, k, is_causal=causal, config=config)
    visible = causal_visible(1024, 1024) if causal else torch.ones(1, 1, 1024, 1024, dtype=torch.bool)
    ref = attention_ref(q, k, v, visible=visible & blocks_to_elements(plan.selected, 1024, 1024, 64))
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    assert 0.0 < stats.density < 1.0
    probes = probe_query_blocks(16, config.probe_blocks, causal=causal)
    mass = sampled_block_mass(q, k, None, causal, None, 64, probes)
    recall = (mass * plan.selected[:, :, probes]).sum(-1).mean((0, 2))
    print(f"probe recall per head {recall.tolist()}, density {stats.density:.3f}")
    assert (recall >= 0.9 - 1e-5).all()


def test_adaptive_keeps_more_true_mass_than_the_plain_estimate_on_hot_keys():
    """Where hot keys are diluted by the antidiagonal mean, the adaptive method
    recovers the true mass on rows it did not probe, at a comparable density."""
    q, k, _ = _spiky(length=2048, seed=3)
    rows = list(range(4, 24, 3))  # not probe rows (the last four)
    mass = sampled_block_mass(q, k, None, True, None, 64, rows)
    results = {}
    for method in ("threshold", "adaptive"):
        # vertical_mass=0: against the plain estimate (vertical lines recover hot keys too, test_lines.py)
        config = xflex.Config(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=0.9, method=method, vertical_mass=0.0)
        selected = xflex.plan(q, k, is_causal=True, config=config).selected[:, :, rows]
        visible = torch.tensor([r + 1 for r in rows], dtype=torch.float32)
        results[method] = ((mass * selected).sum(-1).mean().item(), (selected.sum(-1) / visible).mean().item())
    print(results)
    (plain_recall, plain_density), (adaptive_recall, adaptive_density) = results["threshold"], results["adaptive"]
    assert adaptive_recall >= 0.9 > plain_recall or adaptive_density < plain_density


def test_dense_row_blocks_keeps_short_rows_whole():
    """Rows that see at most N key blocks (a sliding window, the first causal
    rows) keep every visible block; the others are thresholded."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 2048, 16, generator=gen), torch.randn(1, 2, 2048, 16, generator=gen)
    window = 256  # 4-5 blocks of 64
    i = torch.arange(2048)
    sliding = ((i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window))[None, None]
    for mask, causal in ((sliding, False), (None, True)):
        config = xflex.Config(block_size=64, min_seq_len=0, threshold=0.3, method="threshold", dense_row_blocks=8)
        plan = xflex.plan(q, k, mask, causal, config=config)
        visible = plan.visible
        short = visible.sum(-1) <= 8
        assert torch.equal(plan.selected[short], visible[short])
        if causal:
            assert (plan.selected[~short].sum(-1) < visible[~short].sum(-1)).any()
    assert math.isclose(xflex.plan(q, k, sliding, config=config).density(), 1.0)


def test_threshold_one_skips_the_probes_and_keeps_every_block():
    q, k, _ = _spiky()
    plan = xflex.plan(q, k, is_causal=True, config=xflex.Config(block_size=64, threshold=1.0, dense_row_blocks=0, method="adaptive"))
    assert torch.equal(plan.selected, plan.visible)


@pytest.mark.parametrize("causal, ratio", [(True, 0.0), (True, 1.2), (False, 1.2)])
def test_probe_density_of_two_estimates_is_their_union_or_the_max_per_head(causal, ratio):
    """Under ``"mean+max"`` the forecast is the density the plan's rule gives
    on the probe rows: per head the union of the two cuts, or with
    ``max_alone_ratio`` the max's cut at ``1 - (1 - tau) / 10`` alone where,
    on those rows, the mean's keeps more than ``ratio`` times as many blocks."""
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 4, 1000, 32, generator=gen), torch.randn(1, 2, 1000, 32, generator=gen)
    k[:, 1, torch.randint(0, 1000, (6,), generator=gen)] *= 5  # the second kv head's estimates disagree
    base = dict(block_size=64, threshold=0.7, probe_blocks=3, dense_row_blocks=0, vertical_mass=0.0, slash_mass=0.0)
    pattern = call_pattern(q, k, None, causal, 64)
    rows = probe_query_blocks(16, 3, causal=causal)
    cuts = {r: xflex.plan(q, k, is_causal=causal, config=xflex.Config(**base, scoring_reduction=r)).selected[:, :, rows] for r in ("mean", "max")}
    alone = cuts["mean"].sum((2, 3), keepdim=True) > ratio * cuts["max"].sum((2, 3), keepdim=True)
    alone &= ratio > 0
    strict = xflex.plan(q, k, is_causal=causal, config=xflex.Config(**{**base, "threshold": 0.97}, scoring_reduction="max")).selected[:, :, rows]
    want = torch.where(alone, strict, cuts["mean"] | cuts["max"])
    visible = call_pattern(q, k, None, causal, 64).visibility.any[:, :, rows].expand_as(want)
    config = xflex.Config(**base, scoring_reduction="mean+max", max_alone_ratio=ratio)
    assert probe_density(q, k, pattern, config) == pytest.approx((want.sum() / visible.sum()).item(), abs=1e-6)
    if ratio:
        assert alone.any() and not alone.all(), "both branches of the rule should be taken here"
