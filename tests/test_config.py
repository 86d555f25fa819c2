"""Bad settings raise errors that name the setting and what it accepts."""

import dataclasses
from unittest import mock

import pytest
import torch

import xflex


@pytest.mark.parametrize(
    "options,needle",
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.01}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": "high"}, "threshold"),
        ({"threshold": []}, "threshold"),
        ({"threshold_by_call": {"layers.3": 1.5}}, "threshold_by_call"),
        ({"threshold_by_call": {3: 0.9}}, "threshold_by_call"),
        ({"threshold_by_call": "layers.*"}, "threshold_by_call"),
        ({"stride": 0}, "stride"),
        ({"stride": 24}, "stride"),
        ({"stride": 8.0}, "stride"),
        ({"block_size": 96}, "block_size"),
        ({"min_seq_len": -1}, "min_seq_len"),
        ({"keep_sink": 1}, "keep_sink"),
        ({"keep_recent": -64}, "keep_recent"),
        ({"enabled": "yes"}, "enabled"),
        ({"backend": "cuda"}, "backend"),
        ({"method": "xattention"}, "method"),
        ({"scoring_reduction": "sum"}, "scoring_reduction"),
        ({"probe_blocks": 0}, "probe_blocks"),
        ({"dense_row_blocks": -1}, "dense_row_blocks"),
        ({"attention_kernel": "cudnn"}, "attention_kernel"),
        ({"break_even": "yes"}, "break_even"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_options_raise_naming_the_option(options, needle):
    with pytest.raises(ValueError, match=needle):
        xflex.Config.from_options(options)


def test_sparsity_rejects_bad_values_before_running_anything():
    with pytest.raises(ValueError, match="stride"):
        with xflex.sparsity(stride=3):
            pass
    # block_size is fixed when the model is compiled: sparsity() has no such keyword.
    with pytest.raises(TypeError, match="block_size"):
        with xflex.sparsity(block_size=64):  # type: ignore[call-arg]
            pass
    with pytest.raises(ValueError, match="threshold"):
        with xflex.sparsity(threshold=2):
            pass


def test_sparsity_takes_every_run_time_option_and_keeps_unset_ones_apart():
    import inspect

    from xflex.config import RUNTIME_OPTIONS

    parameters = inspect.signature(xflex.sparsity).parameters
    assert set(parameters) == set(RUNTIME_OPTIONS)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is xflex.UNSET for p in parameters.values())
    defaults = xflex.Config(block_size=64)
    with xflex.sparsity(threshold=0.5):
        with xflex.sparsity(stride=4):  # leaves threshold as the outer block set it
            inner = xflex.context.effective_config(defaults)
        with xflex.sparsity(keep_sink=False, keep_recent=0):  # False and 0 are values, not "unset"
            falsy = xflex.context.effective_config(xflex.Config(block_size=64, keep_recent=64))
    assert (inner.threshold, inner.stride, inner.block_size) == (0.5, 4, 64)
    assert (falsy.keep_sink, falsy.keep_recent) == (False, 0)
    assert xflex.context.effective_config(defaults) == defaults


def test_threshold_by_call_first_matching_pattern_wins_and_survives_the_graph_key():
    config = xflex.Config.from_options(
        {"threshold_by_call": {"model.layers.1.*": 1.0, "model.layers.*": [0.5, 0.6]}, "threshold": 0.8}
    )
    assert config.threshold_for("model.layers.1.self_attn") == 1.0
    assert config.threshold_for("model.layers.12.self_attn") == (0.5, 0.6)
    assert config.threshold_for("lm_head_attn") == 0.8
    assert xflex.Config.from_key(config.to_key()) == config
    tau = config.threshold_tensor(2, torch.device("cpu"), "model.layers.3.self_attn")
    assert tau.shape == (1, 2, 1, 1) and tau.flatten().tolist() == pytest.approx([0.5, 0.6])


def test_stride_must_divide_the_compiled_block_size_at_run_time():
    q = torch.randn(1, 2, 256, 16)
    config = xflex.Config(block_size=32, min_seq_len=0, dense_row_blocks=0)
    with xflex.sparsity(stride=64), pytest.raises(ValueError, match="stride"):
        xflex.sparse_sdpa(q, q, q, config=config)


def test_per_head_threshold_needs_one_value_per_head():
    q = torch.randn(1, 2, 256, 16)
    with xflex.sparsity(threshold=[0.9, 0.9, 0.9]), pytest.raises(ValueError, match="one value per query head"):
        xflex.sparse_sdpa(q, q, q, config=xflex.Config(block_size=64, min_seq_len=0, dense_row_blocks=0))


@pytest.mark.parametrize(
    "shapes,kwargs,needle",
    [
        (((1, 4, 256, 16), (1, 3, 256, 16), (1, 3, 256, 16)), {"enable_gqa": True}, "Hq=4, Hkv=3"),
        (((1, 4, 256, 16), (1, 2, 256, 16), (1, 2, 256, 16)), {}, "enable_gqa"),
        (((1, 2, 256, 16), (1, 2, 256, 32), (1, 2, 256, 16)), {}, "E=16 and E=32"),
        (((1, 2, 256, 16), (1, 2, 256, 16), (1, 2, 200, 16)), {}, "key and value"),
        (((1, 2, 256, 16), (2, 2, 256, 16), (2, 2, 256, 16)), {}, "batch"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(shapes, kwargs, needle):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=needle):
        xflex.sparse_sdpa(q, k, v, config=xflex.Config(block_size=64, min_seq_len=0, dense_row_blocks=0), **kwargs)


def test_bad_mask_and_arguments():
    q = torch.randn(1, 2, 256, 16)
    config = xflex.Config(block_size=64, min_seq_len=0, dense_row_blocks=0)
    with pytest.raises(ValueError, match="attn_mask"):
        xflex.sparse_sdpa(q, q, q, attn_mask=torch.ones(3, 256, 256, dtype=torch.bool), config=config)
    with pytest.raises(ValueError, match="attn_mask must be None when is_causal"):
        xflex.sparse_sdpa(q, q, q, attn_mask=torch.ones(256, 256, dtype=torch.bool), is_causal=True, config=config)
    with pytest.raises(ValueError, match="attn_mask must be bool or floating"):
        xflex.sparse_sdpa(q, q, q, attn_mask=torch.ones(256, 256, dtype=torch.int64), config=config)
    with pytest.raises(ValueError, match="dropout_p"):
        xflex.sparse_sdpa(q, q, q, dropout_p=1.5)
    with pytest.raises(TypeError, match="is_causal"):
        xflex.sparse_sdpa(q, q, q, is_causal=1)


def test_break_even_runs_a_call_dense_with_its_reason(monkeypatch):
    """Where a device's break-even is known, a short call, a call whose probe
    rows forecast a dense selection (before scoring) or a dense selection runs
    SDPA itself (exact), and the stats say why."""
    from xflex import policy

    q = torch.randn(1, 2, 512, 16)
    config = xflex.Config(block_size=64, min_seq_len=0, dense_row_blocks=0, threshold=1.0)
    monkeypatch.setitem(policy.MEASURED_BREAK_EVEN, ("cpu", "triton"), policy.BreakEven(min_keys=1024, max_density=0.5))
    with xflex.sparsity() as stats:
        short = xflex.sparse_sdpa(q, q, q, is_causal=True, config=config)
    (record,) = stats.dense_calls
    assert "break-even length 1024" in record.dense_reason
    torch.testing.assert_close(short, torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
    monkeypatch.setitem(policy.MEASURED_BREAK_EVEN, ("cpu", "triton"), policy.BreakEven(min_keys=0, max_density=0.5))
    with mock.patch("xflex.op.plan", side_effect=AssertionError("scored")), xflex.sparsity() as stats:
        xflex.sparse_sdpa(q, q, q, is_causal=True, config=config, name="forecast")  # threshold 1.0: density 1.0
    assert stats.dense_calls[0].dense_reason.startswith("probe rows' selection density 1.00 above")
    monkeypatch.setattr(policy, "probe_density", lambda *args, **kwargs: 0.0)  # a forecast that misses
    with xflex.sparsity() as stats:
        xflex.sparse_sdpa(q, q, q, is_causal=True, config=config, name="missed forecast")
    assert stats.dense_calls[0].dense_reason.startswith("selection density 1.00 above")
    with xflex.sparsity(break_even=False) as stats:
        xflex.sparse_sdpa(q, q, q, is_causal=True, config=config)
    assert stats.dense_calls == [] and stats.density == 1.0


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_call_site_history_skips_the_forecast_and_rechecks_dense_sites(device, monkeypatch):
    """A site whose selection was too dense runs dense without scoring until
    its probe rows are read again (every RECHECK_EVERY calls); a site whose
    selection paid is scored without a forecast or a synchronous density
    check, and its density still reaches the next call; sites are
    independent by name."""
    from xflex import policy

    block = 64 if device == "cpu" else 128  # FlexAttention's GPU tile
    q = torch.randn(1, 2, 16 * block, 16, device=device)
    dense_config = xflex.Config(block_size=block, min_seq_len=0, dense_row_blocks=0, threshold=1.0)
    sparse_config = dataclasses.replace(dense_config, threshold=0.3)
    table_key = (policy.device_kind(q.device), "triton")
    monkeypatch.setitem(policy.MEASURED_BREAK_EVEN, table_key, policy.BreakEven(min_keys=0, max_density=0.5))
    forecasts = []
    real_probe_density = policy.probe_density
    monkeypatch.setattr(policy, "probe_density", lambda *a, **kw: forecasts.append(1) or real_probe_density(*a, **kw))

    with xflex.sparsity() as stats:
        for _ in range(policy.RECHECK_EVERY + 2):
            xflex.sparse_sdpa(q, q, q, is_causal=True, config=dense_config, name="dense site")
        xflex.sparse_sdpa(q, q, q, is_causal=True, config=dense_config)  # unnamed calls keep no history:
        xflex.sparse_sdpa(q, q, q, is_causal=True, config=dense_config)  # each one is forecast
    assert [r.dense_reason[:11] for r in stats.dense_calls[-2:]] == ["probe rows'"] * 2 and len(forecasts) == 4
    del forecasts[2:]
    reasons = [r.dense_reason for r in stats.dense_calls[:-2]]
    assert len(reasons) == policy.RECHECK_EVERY + 2 and len(forecasts) == 2  # the first call and the re-check
    assert reasons[0].startswith("probe rows'") and reasons[-1].startswith("probe rows'")
    assert all(r.startswith("this call site's last selection density 1.00") for r in reasons[1:-1])

    forecasts.clear()
    with xflex.sparsity() as stats:
        first = xflex.sparse_sdpa(q, q, q, is_causal=True, config=sparse_config, name="sparse site")
    density = stats.density
    assert stats.dense_calls == [] and forecasts == [1] and density < 0.5
    with mock.patch.object(xflex.planning.Plan, "density", side_effect=AssertionError("synchronised")):
        with xflex.sparsity() as stats:
            again = xflex.sparse_sdpa(q, q, q, is_causal=True, config=sparse_config, name="sparse site")
    assert stats.dense_calls == [] and forecasts == [1]
    torch.testing.assert_close(again, first)
    if device == "cuda":
        torch.cuda.synchronize()  # the read-back has landed
    # The density read back without waiting reaches the next call: below it, that call runs dense.
    monkeypatch.setitem(policy.MEASURED_BREAK_EVEN, table_key, policy.BreakEven(min_keys=0, max_density=density - 0.01))
    with xflex.sparsity() as stats:
        xflex.sparse_sdpa(q, q, q, is_causal=True, config=sparse_config, name="sparse site")
        xflex.sparse_sdpa(q, q, q, is_causal=True, config=sparse_config, name="another site")
    assert stats.dense_calls[0].dense_reason.startswith(f"this call site's last selection density {density:.2f}")
    # A site of its own: forecast and checked anew, not dense on another site's history.
    assert "call site" not in stats.dense_calls[1].dense_reason and len(forecasts) == 2


def test_auto_attention_kernel_takes_flash_only_where_it_can_run(monkeypatch):
    """``attention_kernel="auto"`` resolves per call: FLASH where it can run
    the call, Triton where it cannot; ``"flash"`` there is an error naming why."""
    from xflex.attention import flex

    q = torch.randn(1, 2, 256, 64)
    kwargs = dict(key_length=256, value_head_dim=64, block_size=128, captures_tensors=False, needs_grad=False)
    assert flex.attention_kernel("auto", q, **kwargs) == "triton"  # CPU: no FLASH
    with pytest.raises(ValueError, match="attention_kernel='flash' cannot run this call: it needs a Hopper"):
        flex.attention_kernel("flash", q, **kwargs)
    monkeypatch.setattr(flex, "flash_unsupported_reason", lambda query, **_: None)
    assert flex.attention_kernel("auto", q, **kwargs) == "flash"
    assert flex.attention_kernel("triton", q, **kwargs) == "triton"
    with pytest.raises(ValueError, match="attention_kernel must be one of"):
        flex.attention_kernel("cudnn", q, **kwargs)


def test_bench_command_needs_cuda(capsys):
    from xflex.cli import main

    if torch.cuda.is_available():
        pytest.skip("checks the message a CPU-only machine prints")
    assert main(["bench", "--lengths", "8K"]) == 1
    assert "needs CUDA" in capsys.readouterr().err


def test_block_sizes_cuda_kernels_cannot_tile_are_refused_by_name():
    from xflex.attention import check_block_size

    check_block_size(torch.device("cpu"), 64)
    check_block_size(torch.device("cuda"), 256)
    with pytest.raises(ValueError, match="block_size=64 cannot run on CUDA"):
        check_block_size(torch.device("cuda"), 64)
