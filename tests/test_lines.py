"""Blocks added beside the threshold cut: vertical lines (``vertical_mass``),
slash lines (``slash_mass``) and the relative floor (``relative_floor``):
each rule against a loop over blocks / diagonals / a row, the plan's added
blocks against exact softmax rows (``sampled_block_mass``) and its own
scores, and what the lines recover on rows the probes never saw: hot keys,
and a slash at an offset the pairing never samples."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import xflex
from xflex.attention import sampled_block_mass
from xflex.attention.selection.floor import relative_floor_blocks
from xflex.attention.selection.probes import PROBE_ROWS_PER_BLOCK, probe_query_blocks
from xflex.attention.selection.slash import slash_blocks
from xflex.attention.selection.vertical import vertical_blocks


def _recall_on_unprobed_rows(make_qk, rows, causal, configs):
    """Per named config, over 3 seeds: the recall of every (head, row) of the
    query blocks ``rows`` (none of them a probe block), and the mean density there."""
    out = {}
    for name, config in configs.items():
        recalls, densities = [], []
        for seed in range(3):
            q, k = make_qk(seed)
            plan = xflex.plan(q, k, is_causal=causal, config=config)
            assert not set(rows) & set(probe_query_blocks(plan.scores.shape[2], config.probe_blocks, causal=causal))
            mass = sampled_block_mass(q, k, None, causal, None, config.block_size, rows)
            selected = plan.selected[:, :, rows]
            recalls.append((mass * selected).sum(-1))
            densities.append(selected.sum() / plan.visible[:, :, rows].sum())
        out[name] = torch.cat(recalls), torch.stack(densities).mean().item()
    print({name: (r.mean().item(), r.min().item(), d) for name, (r, d) in out.items()})
    return out


def _vertical_loop(mass, scores, visible, probes, min_mass, slash=None):
    """The rule spelled out one (batch, head, key block) at a time."""
    B, H, P, nK = scores.shape
    visible = visible.expand_as(scores)
    out = torch.zeros(B, H, 1, nK, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            deficits = [[] for _ in range(nK)]
            for p in range(P):
                est = [scores[b, h, p, j].item() if visible[b, h, p, j] else 0.0 for j in range(nK)]
                total = sum(est)
                for j in range(nK):
                    share = est[j] / total if total > 0 else 0.0
                    on_slash = slash is not None and slash[b, h, p, j]
                    deficits[j].append(0.0 if on_slash else max(0.0, mass[b, h, p, j].item() - share))
            for j in range(nK):
                d = deficits[j]
                trimmed = (sum(d) - max(d)) / (P - 1) if P > 1 else d[0]  # all but the largest probe's
                out[b, h, 0, j] = trimmed >= min_mass and all(abs(j - probe) > 1 for probe in probes)
    return out


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    n_probes=st.integers(1, 4),
    n_k=st.integers(1, 12),
    min_mass=st.floats(0.001, 0.5),
    with_slash=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_vertical_blocks_equal_the_rule_block_by_block(batch, heads, n_probes, n_k, min_mass, with_slash, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, n_probes, n_k)
    visible = torch.rand(shape, generator=gen) < 0.8
    mass = (torch.rand(shape, generator=gen) ** 3).masked_fill(~visible, 0.0)
    mass = mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
    scores = torch.rand(shape, generator=gen) ** 3 * 7.0  # unnormalised, as the scorer's
    probes = sorted(torch.randperm(max(n_k, n_probes), generator=gen)[:n_probes].tolist())
    slash = torch.rand(shape, generator=gen) < 0.2 if with_slash else None
    got = vertical_blocks(mass, scores, visible, probes, min_mass=min_mass, slash=slash)
    assert got.shape == (batch, heads, 1, n_k)
    assert torch.equal(got, _vertical_loop(mass, scores, visible, probes, min_mass, slash))


def _hot_keys(length, heads, kv_heads, seed, head_dim=64):
    """Topics (128-token segments share one of 4 directions: blocks the
    estimate rates well) and 6 keys of 4.5x the norm: logits of random sign
    and large spread, whose mass the antidiagonal mean of S products dilutes."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, length, head_dim, generator=gen)
    k, v = (torch.randn(1, kv_heads, length, head_dim, generator=gen) for _ in range(2))
    topics = F.normalize(torch.randn(4, head_dim, generator=gen), dim=-1)
    topic = topics[torch.randint(0, 4, (length // 128 + 1,), generator=gen).repeat_interleave(128)[:length]]
    q += 6 * topic
    k += 6 * topic
    k[:, :, torch.randint(0, length, (6,), generator=gen)] *= 4.5
    return q, k, v


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 3]),
    length=st.integers(600, 1300),  # ragged: not a multiple of the block or the stride
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_plan_adds_whole_columns_found_on_exact_probe_rows(batch, kv_heads, group, length, causal, seed):
    q, k, _ = _hot_keys(length, kv_heads * group, kv_heads, seed)
    q, k = q.expand(batch, -1, -1, -1).contiguous(), k.expand(batch, -1, -1, -1).contiguous()
    q[-1] += 0.1 * torch.randn(q.shape[1:], generator=torch.Generator().manual_seed(seed))  # batch rows differ
    base = xflex.Config(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=0.9, vertical_mass=0.0, slash_mass=0.0, scoring_reduction="mean")
    plain = xflex.plan(q, k, is_causal=causal, config=base)
    plan = xflex.plan(q, k, is_causal=causal, config=xflex.Config(**{**base.__dict__, "vertical_mass": 0.01}))
    assert plain.lines is None and torch.equal(plan.scores, plain.scores)
    probes = probe_query_blocks(plan.scores.shape[2], base.probe_blocks, causal=causal)
    mass = sampled_block_mass(q, k, None, causal, None, 64, probes, rows_per_block=PROBE_ROWS_PER_BLOCK)  # softmax rows
    expected = vertical_blocks(mass, plan.scores[:, :, probes], plan.visible[:, :, probes], probes, min_mass=0.01)
    assert torch.equal(plan.lines, expected)
    assert torch.equal(plan.selected, plain.selected | (expected & plan.visible))


@pytest.mark.parametrize("causal", [True, False])
def test_vertical_lines_recover_hot_keys_on_rows_the_probes_never_saw(causal):
    base = dict(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=0.9, scoring_reduction="mean", slash_mass=0.0)
    configs = {m: xflex.Config(**base, vertical_mass=m) for m in (0.0, 0.005)}
    (plain, plain_density), (lines, density) = _recall_on_unprobed_rows(
        lambda seed: _hot_keys(2048, 4, 4, seed)[:2], list(range(2, 26, 3)), causal, configs
    ).values()
    assert plain.min() < 0.8, "the inputs should defeat the plain estimate"
    # Measured: worst row +0.14 (causal) / +0.04, mean +0.014 / +0.011, density +0.065 / +0.047.
    assert lines.min() > plain.min() + 0.03 and lines.mean() > plain.mean() + 0.008
    assert density < plain_density + 0.1


@pytest.mark.parametrize(
    "option, make_qk, extra",
    [
        ("vertical_mass", lambda: _hot_keys(1024, 2, 2, seed=1), {"scoring_reduction": "mean", "slash_mass": 0.0}),
        ("slash_mass", lambda: _slashes(2048, 4, seed=0, offset=196), {"scoring_reduction": "max"}),
    ],
)
def test_line_masses_are_validated_and_reach_the_plan_through_sparsity(option, make_qk, extra):
    for bad in (-0.1, 1.0, True, "0.01"):
        with pytest.raises(ValueError, match=option):
            xflex.Config(**{option: bad})
    with pytest.raises(ValueError, match=option):
        with xflex.sparsity(**{option: 2.0}):
            pass
    q, k, v = make_qk()
    config = xflex.Config(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=0.9, **extra)
    densities = {}
    for mass in (0.0, 0.005):
        with xflex.sparsity(**{option: mass}) as stats:
            xflex.sparse_sdpa(q, k, v, is_causal=True, config=config)
        densities[mass] = stats.density
    assert densities[0.005] > densities[0.0]


def _slash_loop(mass, scores, visible, probes, n_q, min_mass):
    """The rule spelled out one (batch, head, diagonal) at a time."""
    B, H, P, nK = scores.shape
    visible = visible.expand_as(scores)
    out = torch.zeros(B, H, n_q, nK, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            deficit = [[0.0] * nK for _ in range(P)]
            for p in range(P):
                est = [scores[b, h, p, k].item() if visible[b, h, p, k] else 0.0 for k in range(nK)]
                total = sum(est)
                for k in range(nK):
                    deficit[p][k] = max(0.0, mass[b, h, p, k].item() - (est[k] / total if total > 0 else 0.0))
            for j in range(-(nK - 1), n_q):
                d = [deficit[p][probe - j] if 0 <= probe - j < nK else 0.0 for p, probe in enumerate(probes)]
                trimmed = (sum(d) - max(d)) / (P - 1) if P > 1 else d[0]
                if j != 0 and trimmed >= min_mass:
                    for i in range(n_q):
                        if 0 <= i - j < nK:
                            out[b, h, i, i - j] = True
    return out


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    n_probes=st.integers(1, 4),
    n_q=st.integers(1, 10),
    n_k=st.integers(1, 12),
    min_mass=st.floats(0.001, 0.5),
    seed=st.integers(0, 2**16),
)
def test_slash_blocks_equal_the_rule_diagonal_by_diagonal(batch, heads, n_probes, n_q, n_k, min_mass, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, n_probes, n_k)
    visible = torch.rand(shape, generator=gen) < 0.8
    mass = (torch.rand(shape, generator=gen) ** 3).masked_fill(~visible, 0.0)
    mass = mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
    scores = torch.rand(shape, generator=gen) ** 3 * 7.0  # unnormalised, as the scorer's
    probes = sorted(torch.randperm(max(n_q, n_probes), generator=gen)[:n_probes].tolist())
    got = slash_blocks(mass, scores, visible, probes, n_query_blocks=max(n_q, probes[-1] + 1), min_mass=min_mass)
    n_q = max(n_q, probes[-1] + 1)
    assert got.shape == (batch, heads, n_q, n_k)
    assert torch.equal(got, _slash_loop(mass, scores, visible, probes, n_q, min_mass))


def _slashes(length, heads, seed, *, offset, head_dim=64):
    """Topics (128-token segments share one of 4 directions: blocks the
    estimate rates well) and, per head, a slash line: query i leans to key
    i - ``offset`` (an offset of residue S/2 = 4 mod 8, which the
    interleaved pairing of S=8 never samples)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, length, head_dim, generator=gen)
    k, v = (torch.randn(1, heads, length, head_dim, generator=gen) for _ in range(2))
    topic = torch.nn.functional.normalize(torch.randn(4, head_dim, generator=gen), dim=-1)
    topic = topic[torch.randint(0, 4, (length // 128 + 1,), generator=gen).repeat_interleave(128)[:length]]
    q += 4 * topic
    k += 4 * topic
    q[:, :, offset:] += 1.2 * k[:, :, :-offset]  # + 1.2 |k|^2 / sqrt(D) ~ +9.6 on that one logit
    return q, k, v


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    length=st.integers(700, 1300),  # ragged: not a multiple of the block or the stride
    causal=st.booleans(),
    reduction=st.sampled_from(["mean", "max"]),
    seed=st.integers(0, 2**16),
)
def test_plan_adds_whole_diagonals_found_on_exact_probe_rows(batch, heads, length, causal, reduction, seed):
    q, k, _ = _slashes(length, heads, seed, offset=196)
    q, k = q.expand(batch, -1, -1, -1).contiguous(), k.expand(batch, -1, -1, -1).contiguous()
    q[-1] += 0.1 * torch.randn(q.shape[1:], generator=torch.Generator().manual_seed(seed))  # batch rows differ
    base = xflex.Config(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=0.9, vertical_mass=0.01, slash_mass=0.0, scoring_reduction=reduction)
    plain = xflex.plan(q, k, is_causal=causal, config=base)
    plan = xflex.plan(q, k, is_causal=causal, config=xflex.Config(**{**base.__dict__, "slash_mass": 0.01}))
    assert torch.equal(plan.scores, plain.scores)
    n_q = plan.scores.shape[2]
    probes = probe_query_blocks(n_q, base.probe_blocks, causal=causal)
    mass = sampled_block_mass(q, k, None, causal, None, 64, probes, rows_per_block=PROBE_ROWS_PER_BLOCK)  # softmax rows
    args = (mass, plan.scores[:, :, probes], plan.visible[:, :, probes], probes)
    slash = slash_blocks(*args, n_query_blocks=n_q, min_mass=0.01)
    # Slash lines first; the vertical rule leaves the probe rows' slash blocks out.
    vertical = vertical_blocks(*args, min_mass=0.01, slash=slash[:, :, probes])
    assert torch.equal(plan.lines, slash | vertical)
    cut = xflex.plan(q, k, is_causal=causal, config=xflex.Config(**{**base.__dict__, "vertical_mass": 0.0, "slash_mass": 0.0}))  # no lines
    assert torch.equal(plan.selected, cut.selected | (plan.lines & plan.visible))


@pytest.mark.parametrize("causal", [True, False])
def test_slash_lines_recover_an_unsampled_offset_on_rows_the_probes_never_saw(causal):
    """With the sharp ``"max"`` estimate, which drops what it cannot see."""
    base = dict(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=0.9, scoring_reduction="max")
    configs = {m: xflex.Config(**base, slash_mass=m) for m in (0.0, 0.005)}
    (plain, plain_density), (lines, density) = _recall_on_unprobed_rows(
        lambda seed: _slashes(2048, 4, seed, offset=196)[:2], list(range(5, 27, 3)), causal, configs  # 196: residue 4 mod 8
    ).values()
    assert plain.min() < 0.8, "the inputs should defeat the plain estimate"
    # Measured: worst row 0.26 -> 0.91 (causal) / 0.32 -> 0.94, mean +0.009 / +0.030, density +0.003 / +0.008.
    assert lines.min() > 0.85 and lines.mean() > plain.mean() + 0.003
    assert density < plain_density + 4 / 32  # at most the two diagonals the slash spans, and their neighbours


def test_a_slash_between_two_block_diagonals_is_kept_as_a_slash_beside_vertical_lines():
    """Offset 740 = 11.56 blocks of 64: each probe row's slash mass lies on two
    key blocks, which two neighbouring probes share; the vertical rule alone
    takes them for columns near the probes, kept on those rows only."""
    base = dict(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=0.9, scoring_reduction="max", vertical_mass=0.005)
    configs = {m: xflex.Config(**base, slash_mass=m) for m in (0.0, 0.005)}
    (plain, plain_density), (lines, density) = _recall_on_unprobed_rows(
        lambda seed: _slashes(2048, 4, seed, offset=740)[:2], list(range(13, 27, 2)), True, configs  # 740: residue 4 mod 8
    ).values()
    assert plain.min() < 0.8, "the inputs should defeat the estimate and the vertical rule"
    assert lines.min() > 0.85 and lines.mean() > plain.mean() + 0.003
    assert density < plain_density + 4 / 32


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    n_q=st.integers(1, 6),
    n_k=st.integers(1, 12),
    ratio=st.floats(0.001, 0.999),
    seed=st.integers(0, 2**16),
)
def test_relative_floor_equals_the_rule_row_by_row(batch, heads, n_q, n_k, ratio, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, n_q, n_k)
    scores = torch.rand(shape, generator=gen) ** 4 * 3.0
    scores[..., 0] = 0.0  # zero scores: kept only where the row's largest is 0 too (then nothing is)
    visible = torch.rand(shape, generator=gen) < 0.7
    got = relative_floor_blocks(scores, visible, ratio)
    expected = torch.zeros(shape, dtype=torch.bool)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in shape[:3])).tolist():
        row = [scores[tuple(index)][j].item() for j in range(n_k) if visible[tuple(index)][j]]
        largest = max(row, default=0.0)
        for j in range(n_k):
            expected[tuple(index)][j] = bool(visible[tuple(index)][j]) and largest > 0 and scores[tuple(index)][j].item() >= ratio * largest
    assert torch.equal(got, expected)


@settings(max_examples=8, deadline=None)
@given(
    length=st.integers(600, 1300),  # ragged: not a multiple of the block or the stride
    heads=st.integers(1, 3),
    causal=st.booleans(),
    reduction=st.sampled_from(["mean", "max"]),
    seed=st.integers(0, 2**16),
)
def test_plan_adds_the_blocks_its_scores_put_above_the_floor(length, heads, causal, reduction, seed):
    q, k, _ = _hot_keys(length, heads, heads, seed)
    base = dict(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=0.8, vertical_mass=0.0, scoring_reduction=reduction)
    plain = xflex.plan(q, k, is_causal=causal, config=xflex.Config(**base))
    plan = xflex.plan(q, k, is_causal=causal, config=xflex.Config(**base, relative_floor=0.05))
    assert torch.equal(plan.scores, plain.scores)
    floor = relative_floor_blocks(plan.scores, plan.visible, 0.05)
    assert torch.equal(plan.selected, plain.selected | floor)


def test_union_floors_each_estimate():
    q, k, _ = _hot_keys(1024, 2, 2, seed=3)
    base = dict(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=0.8, vertical_mass=0.0, scoring_reduction="mean+max", max_alone_ratio=0.0)
    plain = xflex.plan(q, k, is_causal=True, config=xflex.Config(**base))
    plan = xflex.plan(q, k, is_causal=True, config=xflex.Config(**base, relative_floor=0.01))
    # Each estimate's scores as its own plan computes them.
    scores = [xflex.plan(q, k, is_causal=True, config=xflex.Config(**{**base, "scoring_reduction": r})).scores for r in ("mean", "max")]
    floors = [relative_floor_blocks(s, plan.visible, 0.01) for s in scores]
    assert torch.equal(plan.selected, plain.selected | floors[0] | floors[1])
    assert (floors[1] & ~floors[0] & ~plain.selected).any(), "the max's floor should add blocks of its own here"


def test_relative_floor_is_validated_and_reaches_the_plan_through_sparsity():
    for bad in (-0.1, 1.0, True, "0.01"):
        with pytest.raises(ValueError, match="relative_floor"):
            xflex.Config(relative_floor=bad)
    with pytest.raises(ValueError, match="relative_floor"):
        with xflex.sparsity(relative_floor=2.0):
            pass
    q, k, _ = _hot_keys(1024, 2, 2, seed=1)
    config = xflex.Config(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=0.8, scoring_reduction="max")
    densities = {}
    for ratio in (0.0, 0.01):
        with xflex.sparsity(relative_floor=ratio) as stats:
            xflex.sparse_sdpa(q, k, k, is_causal=True, config=config)
        densities[ratio] = stats.density
    assert densities[0.01] > densities[0.0]
