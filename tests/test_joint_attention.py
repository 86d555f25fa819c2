"""Masks and text tokens of joint (text + video) attention: which masks make a
call causal (and keep the sink), and ``text_tokens_by_call``, which keeps a
joint call's text blocks dense. References: ``F.scaled_dot_product_attention``
and masks built by hand."""

import pytest
import torch
import torch.nn.functional as F

import xflex
from xflex.attention import call_pattern, text_token_blocks

BLOCK = 64
L = 320  # 5 blocks
B, H, D = 2, 2, 16


def _padding(valid: list[int]) -> torch.Tensor:
    """``(B, L)`` bool: the first ``valid[b]`` keys of each sequence are real."""
    return torch.arange(L)[None, :] < torch.tensor(valid)[:, None]


def _masks() -> dict[str, torch.Tensor]:
    keys = _padding([L, 200])
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    left = torch.arange(L)[None, :] >= torch.tensor([0, 70])[:, None]  # left padding, as HF batches
    window = causal & ~torch.ones(L, L, dtype=torch.bool).tril(-129)
    # HunyuanVideo's text refiner: (query, key) pairs both real, key 0 always seen.
    pairs = keys[:, None, :, None] & keys[:, None, None, :]
    pairs[..., 0] = True
    return {
        "keys": keys[:, None, None, :],  # (B, 1, 1, L): no query axis
        "keys expanded": keys[:, None, None, :].expand(B, 1, L, L),  # HF's bidirectional form: stride 0
        "pairs": pairs,
        "causal + left padding": causal[None, None] & left[:, None, None, :],
        "sliding window": window,
        "all visible": torch.ones(B, 1, L, L, dtype=torch.bool),
    }


CAUSAL = {"causal + left padding", "sliding window"}


@pytest.mark.parametrize("name", list(_masks()))
def test_only_causal_masks_keep_the_sink(name):
    mask = _masks()[name]
    q = torch.randn(B, H, L, D)
    pattern = call_pattern(q, q, mask, False, BLOCK)
    if name in ("keys", "keys expanded"):
        assert not pattern.causal and pattern.sink is None
        return
    assert pattern.sink.shape[-2:] == (1, 5)
    assert pattern.sink[..., 1:].sum() == 0
    assert pattern.sink[..., 0].all() == (name in CAUSAL) and pattern.sink[..., 0].any() == (name in CAUSAL)


def test_causal_decision_needs_no_host_read():
    """On the meta device any host read of a value fails: the decision is
    made from shapes, strides and device-side reductions only."""
    q = torch.randn(B, H, L, D, device="meta")
    for mask in _masks().values():
        pattern = call_pattern(q, q, mask.to("meta"), False, BLOCK)
        assert pattern.sink is None or pattern.sink.device.type == "meta"


def test_broadcast_key_mask_in_cross_attention_has_no_diagonal():
    q, k = torch.randn(B, H, 128, D), torch.randn(B, H, L, D)
    mask = _padding([L, 200])[:, None, None, :].expand(B, 1, 128, L)
    pattern = call_pattern(q, k, mask, False, BLOCK)
    assert pattern.diagonal_offset is None and pattern.sink is None


def _local_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """q = k with a large norm: each query's own block holds nearly all of its
    mass, so at a low threshold only forced blocks join it."""
    gen = torch.Generator().manual_seed(seed)
    q = 4.0 * torch.randn(B, H, L, D, generator=gen)
    return q, q.clone()


@pytest.mark.parametrize("name", ["pairs", "causal + left padding"])
def test_sink_block_kept_in_every_row_only_for_causal_masks(name):
    mask = _masks()[name]
    q, k = _local_inputs()
    options = dict(block_size=BLOCK, min_seq_len=0, dense_row_blocks=0, method="threshold", threshold=0.5)
    plan = xflex.plan(q, k, mask, config=xflex.Config(**options))
    without_sink = xflex.plan(q, k, mask, config=xflex.Config(**options, keep_sink=False))
    rows = plan.visible[..., 0]  # rows that see key block 0
    kept = plan.selected[..., 0][rows].float().mean().item()
    print(f"{name}: key block 0 kept by {kept:.2f} of the rows that see it")
    if name in CAUSAL:
        assert kept == 1.0 and not without_sink.selected[..., 0][rows].all()
    else:
        assert torch.equal(plan.selected, without_sink.selected)


@pytest.mark.parametrize("name", list(_masks()))
@torch.no_grad()
def test_threshold_one_matches_sdpa(name):
    mask = _masks()[name]
    q, k = _local_inputs(1)
    v = torch.randn_like(q)
    with xflex.sparsity(threshold=1.0):
        out = xflex.sparse_sdpa(q / 4, k / 4, v, attn_mask=mask, config=xflex.Config(block_size=BLOCK, min_seq_len=0))
    expected = F.scaled_dot_product_attention(q / 4, k / 4, v, attn_mask=mask)
    real = mask.expand(B, 1, L, L).any(-1, keepdim=True).expand_as(out)  # rows that see no key are zeros in xflex
    torch.testing.assert_close(out[real], expected[real], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ text tokens ---


@pytest.mark.parametrize("text_tokens, blocks", [(100, [0, 1]), (-100, [3, 4]), (64, [0]), (-20, [4]), (-64, [4])])
def test_text_token_blocks_are_the_blocks_holding_text(text_tokens, blocks):
    holding = text_token_blocks(L, BLOCK, text_tokens=text_tokens, device=torch.device("cpu"))
    assert holding.nonzero().flatten().tolist() == blocks


def _text_config(**options) -> xflex.Config:
    base = dict(block_size=BLOCK, min_seq_len=0, dense_row_blocks=0, method="threshold", threshold=0.5)
    return xflex.Config.from_options({**base, **options})


@pytest.mark.parametrize("method", ["threshold", "adaptive"])
def test_text_blocks_are_added_to_the_cut_made_without_them(method):
    """Text rows and columns are computed whole, on top of the selection the
    call makes without ``text_tokens_by_call`` (a superset: text only adds)."""
    q, k = _local_inputs(2)
    text = {"joint.*": -100, "other": 64}
    plain = xflex.plan(q, k, config=_text_config(method=method), call_name="joint.0")
    plan = xflex.plan(q, k, config=_text_config(method=method, text_tokens_by_call=text), call_name="joint.0")
    assert plan.selected[:, :, 3:].all() and plan.selected[..., 3:].all()  # text rows, text columns
    assert torch.equal(plan.selected[:, :, :3, :3], plain.selected[:, :, :3, :3])  # the video part as without
    assert (plan.selected | ~plain.selected).all()
    other = xflex.plan(q, k, config=_text_config(method=method, text_tokens_by_call=text), call_name="video.0")
    assert torch.equal(other.selected, plain.selected)  # no pattern matches
    v = torch.randn_like(q)
    expected = F.scaled_dot_product_attention(q, k, v)
    assert (plan.attend(q, k, v) - expected).norm() <= (plain.attend(q, k, v) - expected).norm()


def test_text_blocks_respect_the_mask():
    q, k = _local_inputs(3)
    mask = _masks()["keys"]  # the second sequence's keys end at 200: block 4 is hidden
    plan = xflex.plan(q, k, mask, config=_text_config(text_tokens_by_call={"*": -100}), call_name="joint")
    assert not (plan.selected & ~plan.visible).any()
    assert plan.selected[0, :, :, 3:].all() and not plan.selected[1, :, :, 4].any()


@pytest.mark.parametrize(
    "value, needle",
    [({"*": 0}, "non-zero int"), ({"*": 1.5}, "non-zero int"), ({"*": True}, "non-zero int"), ({3: 8}, "patterns"), ("*", "mapping")],
)
def test_text_tokens_by_call_rejects_bad_values(value, needle):
    with pytest.raises(ValueError, match=f"text_tokens_by_call.*{needle}"):
        xflex.Config.from_options({"text_tokens_by_call": value})


def test_text_tokens_by_call_first_match_wins_and_survives_the_graph_key():
    config = xflex.Config.from_options({"text_tokens_by_call": {"single_*": -256, "*": 512}})
    assert config.text_tokens_for("single_transformer_blocks.0.attn") == -256
    assert config.text_tokens_for("transformer_blocks.0.attn") == 512
    assert xflex.Config().text_tokens_for("transformer_blocks.0.attn") == 0
    assert xflex.Config.from_key(config.to_key()) == config
    with xflex.sparsity(text_tokens_by_call={"*": 64}):
        assert xflex.context.effective_config(xflex.Config()).text_tokens_by_call == (("*", 64),)
