"""End to end: `torch.compile(model, backend="xattn")` on a small transformer
(every SDPA call routed through the xflex op), run-time settings without recompiles, options."""

import importlib.metadata
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
from models import TinyTransformer, count_xattn_compiles

import xflex

OPTIONS = {"block_size": 64, "min_seq_len": 64, "dense_row_blocks": 0}


@pytest.fixture(scope="module")
def compiled():
    """One compiled model shared by the module's tests, with its eager twin."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    x = torch.randn(2, 300, 64)
    padding = torch.ones(2, 300, dtype=torch.bool)
    padding[1, :40] = False  # left padding in the second sequence
    with torch.no_grad():
        expected = model(x, padding)
        compiled = torch.compile(model, backend="xattn", options=OPTIONS)
        compiled(x, padding)
    yield compiled, (x, padding), expected
    torch._dynamo.reset()


def test_every_sdpa_call_is_rewritten(compiled):
    report = xflex.last_compile_report()
    assert len(report) == 3 and all(entry.rewritten for entry in report)
    assert [entry.gqa_unrepeated for entry in report] == [1, 1, 2]  # repeat_kv undone


@torch.no_grad()
def test_sparsity_off_and_threshold_one_match_eager(compiled):
    model, inputs, expected = compiled
    with xflex.sparsity(enabled=False) as stats:
        off = model(*inputs)
    assert len(stats.dense_calls) == 3 and stats.density is None
    torch.testing.assert_close(off, expected, rtol=1e-5, atol=1e-5)
    with xflex.sparsity(threshold=1.0) as stats:
        full = model(*inputs)
    assert len(stats.sparse_calls) == 3 and stats.density == 1.0
    torch.testing.assert_close(full, expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_low_threshold_is_sparse_and_toggling_never_recompiles(compiled):
    model, inputs, expected = compiled
    with count_xattn_compiles() as compiles, xflex.sparsity(threshold=0.5, stride=16) as stats:
        sparse = model(*inputs)
    assert stats.density < 1.0
    assert set(stats.density_by_call()) == {"layers.0", "layers.1", "layers.2"}
    assert all(0 < d <= 1 for record in stats.records for d in record.head_density)
    assert not torch.allclose(sparse, expected, rtol=1e-3, atol=1e-3)
    assert torch.isfinite(sparse).all()
    with count_xattn_compiles() as compiles:
        with xflex.sparsity(threshold=0.8, stride=4, keep_recent=64), xflex.sparsity(enabled=False):
            model(*inputs)
        with xflex.sparsity(threshold=[0.3, 0.6, 0.9, 1.0]):  # one per query head
            model(*inputs)
        with xflex.sparsity(threshold=0.5, stride=16, threshold_by_call={"layers.1": 1.0}) as stats:
            model(*inputs)
    assert compiles.call_count == 0
    by_call = stats.density_by_call()
    assert by_call["layers.1"] == 1.0 and by_call["layers.0"] < 1.0 and by_call["layers.2"] < 1.0


@torch.no_grad()
def test_calibrated_thresholds_apply_per_layer_without_recompiling(compiled):
    model, inputs, _ = compiled
    with count_xattn_compiles() as compiles:
        with xflex.calibration(target_recall=0.95, thresholds=(0.3, 0.6, 0.9, 0.99), samples=3) as cal:
            model(*inputs)
        with xflex.sparsity(threshold=0.3, threshold_by_call=cal.threshold_by_call) as stats:
            model(*inputs)
    assert compiles.call_count == 0
    assert set(cal.threshold_by_call) == {"layers.0", "layers.1", "layers.2"}
    recalls = cal.recall_by_call_and_head()
    for name, taus in cal.threshold_by_call.items():
        taus = taus if isinstance(taus, tuple) else (taus,) * len(recalls[name])  # one float where every head agrees
        for by_tau, tau in zip(recalls[name], taus, strict=True):
            assert by_tau[tau] >= 0.95 or tau == 0.99
    assert len(stats.sparse_calls) == 3


def test_nested_contexts_restore_the_outer_settings():
    base = xflex.Config()
    with xflex.sparsity(threshold=0.7):
        with pytest.raises(RuntimeError):
            with xflex.sparsity(threshold=0.95, stride=16):
                assert xflex.context.effective_config(base).threshold == 0.95
                raise RuntimeError("boom")
        assert xflex.context.effective_config(base).threshold == 0.7
        assert xflex.context.effective_config(base).stride == base.stride
    assert xflex.context.effective_config(base) == base


def test_backend_is_an_entry_point():
    names = [ep.name for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")]
    assert "xattn" in names


@pytest.mark.parametrize(
    "options,needle",
    [
        ({"treshold": 0.9}, "treshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"stride": 3}, "stride"),
        ({"block_size": 100}, "block_size"),
    ],
)
def test_bad_options_name_the_option(options, needle):
    torch._dynamo.reset()
    fn = torch.compile(lambda x: torch.nn.functional.scaled_dot_product_attention(x, x, x), backend="xattn", options=options)
    with pytest.raises(Exception, match=needle) as info:
        fn(torch.randn(1, 1, 8, 4))
    assert "xflex" in str(info.value) or "xattn" in str(info.value)


def test_mode_reaches_inductor():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    with mock.patch("torch._inductor.compile_fx.compile_fx") as compile_fx:
        xflex.xattn(gm, [torch.randn(2, 4)], options={"threshold": 0.8, "max_autotune": False}, mode="max-autotune")
    patches = compile_fx.call_args.kwargs["config_patches"]
    assert patches["max_autotune"] is False  # explicit option wins over the mode
    assert patches["coordinate_descent_tuning"] is True
    with pytest.raises(ValueError, match="mode"):
        xflex.xattn(gm, [torch.randn(2, 4)], mode="fastest")


def test_reduce_overhead_partitions_the_graph_around_the_op():
    # CUDA graphs run on a GPU (tests/test_robustness.py); here: what Inductor is told.
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    with mock.patch("torch._inductor.compile_fx.compile_fx") as compile_fx:
        xflex.xattn(gm, [torch.randn(2, 4)], mode="reduce-overhead")
    patches = compile_fx.call_args.kwargs["config_patches"]
    assert patches["triton.cudagraphs"] is True and patches["graph_partition"] is True
    for op in (torch.ops.xflex.sparse_sdpa.default, torch.ops.xflex.sparse_sdpa_backward.default):
        assert torch.Tag.cudagraph_unsafe in op.tags


@pytest.mark.slow
def test_backend_works_in_a_process_that_never_imports_xflex(tmp_path):
    script = textwrap.dedent(
        """
        import sys, torch
        import torch.nn.functional as F

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(32, 96)
            def forward(self, x):
                q, k, v = self.proj(x).view(1, 256, 3, 2, 16).permute(2, 0, 3, 1, 4)
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        torch.manual_seed(0)
        model, x = Model().eval(), torch.randn(1, 256, 32)
        with torch.no_grad():
            expected = model(x)
            dense = torch.compile(model, backend="xattn", options={"threshold": 1.0, "block_size": 32, "min_seq_len": 32, "dense_row_blocks": 0})
            out = dense(x)
            assert "xflex" in sys.modules  # loaded by torch through the entry point
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            import xflex
            with xflex.sparsity(threshold=0.5) as stats:
                dense(x)
            assert stats.density < 1.0, stats
            with xflex.sparsity(enabled=False):
                torch.testing.assert_close(dense(x), expected, rtol=1e-6, atol=1e-6)
        print("OK", stats.density)
        """
    )
    assert "xflex" not in script.split("assert \"xflex\" in sys.modules")[0]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    print(result.stdout[-2000:], result.stderr[-4000:])
    assert result.returncode == 0 and "OK" in result.stdout
