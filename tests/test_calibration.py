"""Per-call threshold calibration: exact block masses against a full-matrix
softmax, and the recall bookkeeping of ``xflex.calibration`` on eager calls."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import xflex
from xflex.attention import sample_query_blocks, sampled_block_mass

CONFIG = xflex.Config(block_size=64, min_seq_len=0, dense_row_blocks=0)


def _reference_block_mass(q, k, mask, scale, block_size, q_blocks):
    """Full ``(B, H, Lq, Lk)`` softmax (K repeated per query head), then per
    sampled query block: rows summed per key block, averaged over rows."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
    probs = torch.softmax(logits, -1).nan_to_num(0.0)
    n_k = math.ceil(k.shape[2] / block_size)
    out = []
    for block in q_blocks:
        rows = probs[:, :, block * block_size : (block + 1) * block_size]
        per_key_block = torch.stack([rows[..., j * block_size : (j + 1) * block_size].sum(-1) for j in range(n_k)], -1)
        out.append(per_key_block.mean(2))
    return torch.stack(out, 2)


@st.composite
def _mass_case(draw):
    batch, hkv, groups = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    q_len, kv_len = draw(st.integers(1, 200)), draw(st.integers(1, 200))
    block_size = draw(st.sampled_from([32, 64]))
    kind = draw(st.sampled_from(["causal", "none", "bool", "float", "keys", "2d"]))
    return batch, hkv, groups, q_len, kv_len, block_size, kind, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(_mass_case())
def test_sampled_block_mass_matches_full_softmax(case):
    batch, hkv, groups, q_len, kv_len, block_size, kind, seed = case
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * groups
    q, k = torch.randn(batch, hq, q_len, 16, generator=gen), torch.randn(batch, hkv, kv_len, 16, generator=gen)
    mask = None
    if kind == "causal":
        mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril()
    elif kind == "bool":
        mask = torch.rand(batch, 1, q_len, kv_len, generator=gen) < 0.7
    elif kind == "float":
        bias = torch.randn(1, hq, q_len, kv_len, generator=gen)
        mask = bias.masked_fill(torch.rand(1, hq, q_len, kv_len, generator=gen) < 0.2, float("-inf"))
    elif kind == "keys":
        mask = torch.rand(batch, 1, 1, kv_len, generator=gen) < 0.8
    elif kind == "2d":  # (Lq, Lk): broadcast over batch and heads
        mask = torch.rand(q_len, kv_len, generator=gen) < 0.7
    q_blocks = sample_query_blocks(math.ceil(q_len / block_size), 3)
    got = sampled_block_mass(q, k, None if kind == "causal" else mask, kind == "causal", 0.3, block_size, q_blocks)
    want = _reference_block_mass(q, k, mask, 0.3, block_size, q_blocks)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)


def test_sample_query_blocks_spreads_and_keeps_the_last():
    assert sample_query_blocks(3, 8) == [0, 1, 2]
    picked = sample_query_blocks(100, 5)
    assert picked[0] == 0 and picked[-1] == 99 and len(picked) == 5


def _peaky_and_flat_inputs():
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(1, 2, 512, 16, generator=gen) * 0.1
    direction = torch.randn(16, generator=gen)
    peaky = torch.randn(1, 2, 512, 16, generator=gen) + 3 * direction * torch.randn(1, 2, 512, 1, generator=gen).sign()
    return flat, peaky


@torch.no_grad()
def test_calibration_picks_per_call_the_smallest_threshold_reaching_the_target():
    taus = (0.5, 0.8, 0.9, 1.0)
    with xflex.calibration(target_recall=0.85, thresholds=taus, samples=4) as cal:
        for name, x in zip(("flat", "peaky"), _peaky_and_flat_inputs()):
            xflex.sparse_sdpa(x, x, x, is_causal=True, config=CONFIG, name=name)
    recalls = cal.recall_by_call_and_head()
    assert set(recalls) == {"flat", "peaky"} and set(cal.recall_by_call()) == {"flat", "peaky"}
    assert cal.seconds > 0 and cal.options["method"] == "threshold" and cal.options["scorer"] == CONFIG.scorer == "interleaved"
    for name, heads in recalls.items():
        chosen = cal.threshold_by_call[name]
        chosen = chosen if isinstance(chosen, tuple) else (chosen,) * len(heads)
        for by_tau, tau in zip(heads, chosen):
            values = [by_tau[t] for t in taus]
            assert values == sorted(values), f"{name}: recall fell as tau rose: {values}"
            assert values[-1] == pytest.approx(1.0, abs=1e-5), "tau 1.0 keeps every visible block"
            assert by_tau[tau] >= 0.85 and all(by_tau[t] < 0.85 for t in taus if t < tau)


@torch.no_grad()
def test_recall_agrees_with_an_independent_count():
    """Recall at one tau = exact mass (full softmax) inside the blocks the op selects."""
    _, x = _peaky_and_flat_inputs()
    with xflex.calibration(thresholds=(0.6,), samples=4) as cal:
        xflex.sparse_sdpa(x, x, x, is_causal=True, config=CONFIG, name="call")
    reference_config = xflex.Config(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=0.6, method="threshold")
    selected = xflex.plan(x, x, is_causal=True, config=reference_config).selected
    q_blocks = sample_query_blocks(selected.shape[2], 4)
    mass = _reference_block_mass(x, x, torch.ones(512, 512, dtype=torch.bool).tril(), 0.25, 64, q_blocks)
    expected = (mass * selected[:, :, q_blocks]).sum(-1).mean().item()
    assert cal.recall_by_call()["call"][0.6] == pytest.approx(expected, rel=1e-5)


def test_calibration_outside_the_block_records_nothing_and_bad_arguments_raise():
    x = torch.randn(1, 2, 256, 16)
    with xflex.calibration() as cal:
        pass
    xflex.sparse_sdpa(x, x, x, is_causal=True, config=CONFIG)
    assert cal.recalls == {}
    for kwargs, needle in (
        (dict(target_recall=0.0), "target_recall"),
        (dict(thresholds=(0.9, 0.5)), "thresholds"),
        (dict(thresholds=()), "thresholds"),
        (dict(samples=0), "samples"),
    ):
        with pytest.raises(ValueError, match=needle), xflex.calibration(**kwargs):
            pass


@torch.no_grad()
def test_calibration_keeps_the_scorer_its_thresholds_hold_for():
    """Thresholds calibrated with one scorer come back with it, and a block
    that measured calls under two scorers refuses to mix them."""
    flat, peaky = _peaky_and_flat_inputs()
    with xflex.sparsity(scorer="antidiagonal"), xflex.calibration(thresholds=(0.9, 1.0), samples=2) as cal:
        xflex.sparse_sdpa(peaky, peaky, peaky, is_causal=True, config=CONFIG, name="peaky")
    assert cal.options["scorer"] == "antidiagonal" != CONFIG.scorer
    with pytest.raises(ValueError, match="scorer='interleaved'"), xflex.calibration(samples=2):
        with xflex.sparsity(scorer="antidiagonal"):
            xflex.sparse_sdpa(peaky, peaky, peaky, is_causal=True, config=CONFIG, name="peaky")
        xflex.sparse_sdpa(flat, flat, flat, is_causal=True, config=CONFIG, name="flat")
