"""The plain-torch antidiagonal scorer against an explicit-loop reference:
ragged lengths, Lq != Lk, GQA, both causal alignments, block masks."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from reference import antidiagonal_scores_naive

from xflex.attention.scoring import antidiagonal_block_scores, paired_query_rows


@st.composite
def scoring_case(draw):
    stride = draw(st.sampled_from([2, 4, 8]))
    block_size = stride * draw(st.sampled_from([2, 4]))
    hkv = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    q_len = draw(st.integers(1, 70))
    kv_len = draw(st.integers(1, 70))
    causal = draw(st.sampled_from(["none", "top_left", "bottom_right"]))
    offset = {"none": None, "top_left": 0, "bottom_right": kv_len - q_len}[causal]
    masked = draw(st.booleans())
    batch = draw(st.sampled_from([1, 2]))
    pairing = draw(st.sampled_from(["antidiagonal", "interleaved"]))
    reduction = draw(st.sampled_from(["mean", "max", "mean+max"]))
    return stride, block_size, hkv, groups, q_len, kv_len, offset, masked, batch, pairing, reduction


@settings(max_examples=40, deadline=None)
@given(scoring_case(), st.integers(0, 2**31 - 1))
def test_reference_scorer_matches_explicit_loops(case, seed):
    stride, block_size, hkv, groups, q_len, kv_len, offset, masked, batch, pairing, reduction = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hkv * groups, q_len, 8, generator=gen)
    k = torch.randn(batch, hkv, kv_len, 8, generator=gen)
    block_visible = None
    if masked:
        shape = (batch, 1, math.ceil(q_len / block_size), math.ceil(kv_len / block_size))
        block_visible = torch.rand(shape, generator=gen) < 0.7
    kwargs = dict(
        stride=stride, block_size=block_size, scale=0.7, causal_offset=offset, block_visible=block_visible, pairing=pairing,
        reduction=reduction,
    )  # fmt: skip
    fast = antidiagonal_block_scores(q, k, chunk_tokens=block_size, **kwargs)
    slow = antidiagonal_scores_naive(q, k, **kwargs)
    print("max diff", (fast.double() - slow).abs().max().item())
    torch.testing.assert_close(fast.double(), slow, rtol=1e-5, atol=1e-6)


def test_block_rows_sum_to_their_query_tiles():
    q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)
    scores = antidiagonal_block_scores(q, k, stride=8, block_size=64, causal_offset=0)
    torch.testing.assert_close(scores.sum(-1), torch.full((1, 2, 4), 8.0))
    # Nothing above the causal edge.
    assert (scores.triu(1) == 0).all()


def test_antidiagonal_sees_a_slash_pattern():
    """Queries that match the key one position back (a slash pattern) make the
    diagonal block the highest-scoring block of every row."""
    torch.manual_seed(0)
    L, D = 512, 32
    k = torch.randn(1, 1, L, D)
    q = torch.roll(k, shifts=1, dims=2) * 4  # q_i ~ k_{i-1}: a slash one below the diagonal
    scores = antidiagonal_block_scores(q, k, stride=8, block_size=64, causal_offset=0)
    assert torch.equal(scores[0, 0].argmax(-1), torch.arange(L // 64))


@pytest.mark.parametrize("stride", [2, 4, 8, 16, 32])
def test_interleaved_pairing_sees_every_offset_residue_but_one(stride):
    """Both pairings are permutations (each tile row and column once); the
    antidiagonal's query - key offsets are all odd, the interleaved pairing's
    cover every residue mod S except S/2."""
    for pairing, residues in (("antidiagonal", set(range(1, stride, 2))), ("interleaved", set(range(stride)) - {stride // 2})):
        rows = paired_query_rows(stride, pairing)
        assert sorted(rows) == list(range(stride))
        assert {(q - r) % stride for r, q in enumerate(rows)} == residues


@pytest.mark.parametrize("shift", [1, 2, 3, 4, 5, 6])
def test_slash_lines_each_pairing_cannot_see(shift):
    """Queries that match the key ``shift`` positions back (a slash line): an
    estimate sees the line where the line's block scores at least half the
    row's largest block in every row. The antidiagonal sees odd shifts only
    (twice per S rows), the interleaved pairing every shift but S/2 (once)."""
    torch.manual_seed(0)
    L, D, S, block = 1024, 32, 8, 64
    k = torch.randn(1, 1, L, D)
    q = torch.roll(k, shifts=shift, dims=2) * 4  # q_i ~ k_{i-shift}: inside the diagonal block for most rows
    for pairing, sees in (("interleaved", shift % S != S // 2), ("antidiagonal", shift % 2 == 1)):
        scores = antidiagonal_block_scores(q, k, stride=S, block_size=block, causal_offset=0, pairing=pairing)[0, 0]
        worst = (scores.diagonal() / scores.amax(-1)).min().item()
        assert worst > 0.5 if sees else worst < 0.5, (pairing, worst)


@pytest.mark.parametrize("seed", range(4))
def test_max_reduction_rates_a_large_norm_key_above_the_mean(seed):
    """A key of large norm that 4 query rows retrieve: the mean of a tile's
    products rates its block below its true mass (its exponential misses the
    products' spread, ``reference`` module docstring); the max rates it higher."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 1, 256, 64, generator=gen), torch.randn(1, 1, 256, 64, generator=gen)
    direction = torch.nn.functional.normalize(torch.randn(64, generator=gen), dim=0)
    k[0, 0, 40] += 40 * direction  # in key block 0 of 2 (block size 128)
    q[0, 0, 200:204] += 2 * direction  # 4 rows of query block 1
    true_mass = ((q[0, 0, 128:] @ k[0, 0].T) / 8.0).softmax(-1)[:, :128].sum(-1).mean().item()
    kwargs = dict(stride=8, block_size=128, pairing="interleaved")
    mean = antidiagonal_block_scores(q, k, **kwargs)[0, 0, 1, 0].item() / 16
    best = antidiagonal_block_scores(q, k, reduction="max", **kwargs)[0, 0, 1, 0].item() / 16
    print(f"true {true_mass:.3f}, mean {mean:.3f}, max {best:.3f}")
    assert mean < true_mass - 0.04
    assert best > mean + 0.015


def test_reduction_is_validated():
    q = torch.randn(1, 1, 64, 8)
    with pytest.raises(ValueError, match="reduction must be one of"):
        antidiagonal_block_scores(q, q, stride=8, block_size=32, reduction="sum")


def test_reduction_option_reaches_the_scorer(monkeypatch):
    import xflex
    from xflex import planning

    seen = []

    def recording(*args, reduction, **kwargs):
        seen.append(reduction)
        return antidiagonal_block_scores(*args, reduction=reduction, **{k: v for k, v in kwargs.items() if k not in ("precision", "backend")})

    monkeypatch.setattr(planning, "score_blocks", recording)
    x = torch.randn(1, 2, 512, 16)
    config = xflex.Config(block_size=64, min_seq_len=0, dense_row_blocks=0, break_even=False, vertical_mass=0.0)
    with xflex.sparsity(scoring_reduction="max"):
        xflex.sparse_sdpa(x, x, x, is_causal=True, config=config)
    xflex.sparse_sdpa(x, x, x, is_causal=True, config=config)
    assert seen == ["max", "mean+max"]


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 3]),
    length=st.integers(300, 900),  # ragged: not a multiple of the block or the stride
    causal=st.booleans(),
    vertical_mass=st.sampled_from([0.0, 0.01]),
    seed=st.integers(0, 2**16),
)
def test_mean_plus_max_keeps_the_blocks_either_cut_keeps(batch, kv_heads, group, length, causal, vertical_mass, seed):
    """``"mean+max"``: the mean's selection (its lines included) united with
    the max's cut at the same threshold; the plan's scores stay the mean's."""
    import xflex

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, length, 32, generator=gen)
    k = torch.randn(batch, kv_heads, length, 32, generator=gen)
    k[:, :, torch.randint(0, length, (4,), generator=gen)] *= 4  # large-norm keys: the two estimates differ
    base = dict(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=0.8, vertical_mass=vertical_mass, slash_mass=0.0, max_alone_ratio=0.0)
    plans = {
        reduction: xflex.plan(q, k, is_causal=causal, config=xflex.Config(**base, scoring_reduction=reduction))
        for reduction in ("mean", "mean+max")
    }
    max_cut = xflex.plan(q, k, is_causal=causal, config=xflex.Config(**{**base, "vertical_mass": 0.0}, scoring_reduction="max"))
    assert torch.equal(plans["mean+max"].scores, plans["mean"].scores)
    assert torch.equal(plans["mean+max"].selected, plans["mean"].selected | max_cut.selected)


def _llm_and_spiky_heads(batch: int, kv_heads: int, group: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k whose even kv heads come from the ``llm`` input family and odd
    ones from ``spiky`` (hot keys, slash lines: there the mean's cut keeps
    ~1.8x the max's blocks at tau 0.95, on ``llm`` ~1.1x)."""
    from xflex.benchmark.inputs import make_inputs

    def head(family: str, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, _ = make_inputs(family, length, heads=group, kv_heads=1, head_dim=32, device="cpu", dtype=torch.float32, seed=seed + b)
        return q, k

    heads = [[head("spiky" if h % 2 else "llm", b) for h in range(kv_heads)] for b in range(batch)]
    return tuple(torch.cat([torch.cat([h[i] for h in row], 1) for row in heads], 0) for i in (0, 1))  # type: ignore[return-value]


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2]),
    length=st.integers(500, 1100),  # ragged: not a multiple of the block or the stride
    causal=st.booleans(),
    vertical_mass=st.sampled_from([0.0, 0.01]),
    ratio=st.sampled_from([1.0, 1.5, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_max_alone_heads_keep_the_max_plan_and_the_others_the_union(batch, kv_heads, group, length, causal, vertical_mass, ratio, seed):
    """``max_alone_ratio``: per (batch, head), the max's whole plan (its
    cut, lines and scores) at the stricter threshold ``1 - (1 - tau) / 10``
    where, at tau, the mean's cut keeps more than ``ratio`` times the max's
    blocks, else the union's plan."""
    import xflex

    q, k = _llm_and_spiky_heads(batch, kv_heads, group, length, seed)
    base = dict(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=0.8, vertical_mass=vertical_mass)

    def plan(reduction: str, **options) -> "xflex.Plan":
        return xflex.plan(q, k, is_causal=causal, config=xflex.Config(**{**base, **options}, scoring_reduction=reduction))

    got, union, alone_plan = plan("mean+max", max_alone_ratio=ratio), plan("mean+max", max_alone_ratio=0.0), plan("max", threshold=0.98)
    cuts = {r: plan(r, vertical_mass=0.0, slash_mass=0.0).selected.sum((2, 3), keepdim=True) for r in ("mean", "max")}
    alone = cuts["mean"] > ratio * cuts["max"]
    assert torch.equal(got.selected, torch.where(alone, alone_plan.selected, union.selected))
    assert torch.equal(got.scores, torch.where(alone, alone_plan.scores, union.scores))


def test_max_alone_ratio_splits_spiky_heads_from_smooth_ones_and_is_validated():
    import xflex

    q, k = _llm_and_spiky_heads(1, 2, 1, 1024, seed=0)
    base = dict(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=0.95, scoring_reduction="mean+max")
    union = xflex.plan(q, k, is_causal=True, config=xflex.Config(**base, max_alone_ratio=0.0))
    max_plan = xflex.plan(q, k, is_causal=True, config=xflex.Config(**{**base, "scoring_reduction": "max", "threshold": 0.995}))
    chosen = xflex.plan(q, k, is_causal=True, config=xflex.Config(**base, max_alone_ratio=1.5))
    assert torch.equal(chosen.selected[:, 0], union.selected[:, 0]), "the llm head keeps the union"
    assert torch.equal(chosen.selected[:, 1], max_plan.selected[:, 1]), "the spiky head keeps the max's plan"
    assert chosen.selected[:, 1].sum() < union.selected[:, 1].sum()
    for bad in (0.5, -1.0, True, "2", float("nan")):
        with pytest.raises(ValueError, match="max_alone_ratio"):
            xflex.Config(max_alone_ratio=bad)


def test_mean_plus_max_adds_blocks_and_other_spellings_are_refused():
    import xflex

    assert xflex.Config(scoring_reduction="mean+max").reductions == ("mean", "max")
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 1024, 32, generator=gen), torch.randn(1, 2, 1024, 32, generator=gen)
    k[:, :, torch.randint(0, 1024, (4,), generator=gen)] *= 4
    base = dict(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=0.8, max_alone_ratio=0.0)
    kept = {r: xflex.plan(q, k, is_causal=True, config=xflex.Config(**base, scoring_reduction=r)).selected.sum() for r in ("mean", "mean+max")}
    assert kept["mean+max"] > kept["mean"]
    for bad in ("max+mean", "mean,max", "sum"):
        with pytest.raises(ValueError, match="scoring_reduction"):
            xflex.Config(scoring_reduction=bad)
