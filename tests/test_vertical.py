"""Vertical lines (``vertical_mass``): the rule against a loop over blocks,
the plan's vertical blocks against exact softmax rows (``sampled_block_mass``)
and its own scores, the selection as the threshold's plus whole columns, and
hot keys recovered on rows the probes never saw."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import xflex
from xflex.attention import sampled_block_mass
from xflex.attention.selection.probes import PROBE_ROWS_PER_BLOCK, probe_query_blocks
from xflex.attention.selection.vertical import vertical_blocks


def _vertical_loop(mass, scores, visible, probes, min_mass):
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
                    deficits[j].append(max(0.0, mass[b, h, p, j].item() - share))
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
    seed=st.integers(0, 2**16),
)
def test_vertical_blocks_equal_the_rule_block_by_block(batch, heads, n_probes, n_k, min_mass, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, n_probes, n_k)
    visible = torch.rand(shape, generator=gen) < 0.8
    mass = (torch.rand(shape, generator=gen) ** 3).masked_fill(~visible, 0.0)
    mass = mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
    scores = torch.rand(shape, generator=gen) ** 3 * 7.0  # unnormalised, as the scorer's
    probes = sorted(torch.randperm(max(n_k, n_probes), generator=gen)[:n_probes].tolist())
    got = vertical_blocks(mass, scores, visible, probes, min_mass=min_mass)
    assert got.shape == (batch, heads, 1, n_k)
    assert torch.equal(got, _vertical_loop(mass, scores, visible, probes, min_mass))


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
    base = xflex.Config(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=0.9, vertical_mass=0.0)
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
    rows = list(range(2, 26, 3))  # query blocks of 64, none of them a probe block (last four / spread)
    recall, density = {}, {}
    for vertical_mass in (0.0, 0.005):
        recalls, densities = [], []
        for seed in range(3):
            q, k, _ = _hot_keys(2048, 4, 4, seed)
            config = xflex.Config(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=0.9, vertical_mass=vertical_mass)
            plan = xflex.plan(q, k, is_causal=causal, config=config)
            assert not set(rows) & set(probe_query_blocks(32, config.probe_blocks, causal=causal))
            mass = sampled_block_mass(q, k, None, causal, None, 64, rows)
            selected = plan.selected[:, :, rows]
            recalls.append((mass * selected).sum(-1))
            densities.append(selected.sum() / plan.visible[:, :, rows].sum())
        recall[vertical_mass], density[vertical_mass] = torch.cat(recalls), torch.stack(densities).mean().item()
    print({m: (r.mean().item(), r.min().item(), density[m]) for m, r in recall.items()})
    assert recall[0.0].min() < 0.8, "the inputs should defeat the plain estimate"
    # Measured: worst row +0.14 (causal) / +0.04, mean +0.014 / +0.011, density +0.065 / +0.047.
    assert recall[0.005].min() > recall[0.0].min() + 0.03 and recall[0.005].mean() > recall[0.0].mean() + 0.008
    assert density[0.005] < density[0.0] + 0.1


def test_vertical_mass_is_validated_and_reaches_the_plan_through_sparsity():
    for bad in (-0.1, 1.0, True, "0.01"):
        with pytest.raises(ValueError, match="vertical_mass"):
            xflex.Config(vertical_mass=bad)
    with pytest.raises(ValueError, match="vertical_mass"):
        with xflex.sparsity(vertical_mass=2.0):
            pass
    q, k, v = _hot_keys(1024, 2, 2, seed=1)
    config = xflex.Config(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=0.9)
    densities = {}
    for vertical_mass in (0.0, 0.005):
        with xflex.sparsity(vertical_mass=vertical_mass) as stats:
            xflex.sparse_sdpa(q, k, v, is_causal=True, config=config)
        densities[vertical_mass] = stats.density
    assert densities[0.005] > densities[0.0]
