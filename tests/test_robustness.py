"""Robustness: dynamic shapes without extra recompiles, SDPA corner cases,
gradients and dropout, random settings through the compiled path."""


from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from models import TinyTransformer, count_xattn_compiles
from reference import attention_ref, blocks_to_elements, causal_visible

import xflex

HAS_CUDA = torch.cuda.is_available()
BLOCK = 64


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The layouts models pass: contiguous (B, H, L, D), or a (B, L, H, D)
    buffer transposed, or a sliced fused-QKV buffer."""
    if layout == "transposed":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":
        return torch.cat([x, torch.zeros_like(x)], dim=-1)[..., : x.shape[-1]]
    return x


@st.composite
def sdpa_call(draw):
    groups = draw(st.sampled_from([1, 2, 4, 8]))
    hkv = draw(st.sampled_from([1, 2]))
    q_len = draw(st.sampled_from([70, 130, 257]))
    kv_len = draw(st.sampled_from([q_len, 200]))
    head_dim = draw(st.sampled_from([16, 64, 80]))
    value_dim = draw(st.sampled_from([head_dim, 32]))
    causal = draw(st.booleans())
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    threshold = draw(st.sampled_from([1.0, 0.7, 0.3]))
    stride = draw(st.sampled_from([4, 8, 16]))
    return groups, hkv, q_len, kv_len, head_dim, value_dim, causal, layout, dtype, threshold, stride


# Each new head dim, dtype and layout compiles FlexAttention once on the CPU
# (lengths share power-of-two buckets): keep examples few.
@settings(max_examples=7, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sdpa_call(), st.integers(0, 2**31 - 1))
def test_corner_cases_match_the_reference(call, seed):
    """Any shape: exact SDPA semantics at tau=1, the selected blocks otherwise,
    or a dense fallback with a reason (e.g. query shorter than a block)."""
    groups, hkv, q_len, kv_len, head_dim, value_dim, causal, layout, dtype, threshold, stride = call
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * groups
    q = _layout(torch.randn(2, hq, q_len, head_dim, generator=gen).to(dtype), layout)
    k = _layout(torch.randn(2, hkv, kv_len, head_dim, generator=gen).to(dtype), layout)
    v = _layout(torch.randn(2, hkv, kv_len, value_dim, generator=gen).to(dtype), layout)
    config = xflex.Config(block_size=BLOCK, min_seq_len=BLOCK, dense_row_blocks=0, stride=stride, threshold=threshold)
    with xflex.sparsity() as stats:
        out = xflex.sparse_sdpa(q, k, v, is_causal=causal, enable_gqa=groups > 1, config=config)
    assert out.shape == (2, hq, q_len, value_dim) and out.dtype == dtype
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=groups > 1)
    if stats.dense_calls:
        assert q_len < BLOCK
        assert torch.equal(out, sdpa)
        return
    selected = xflex.plan(q, k, is_causal=causal, config=config).selected
    visible = causal_visible(q_len, kv_len) if causal else torch.ones(1, 1, q_len, kv_len, dtype=torch.bool)
    ref = attention_ref(q, k, v, visible=visible & blocks_to_elements(selected, q_len, kv_len, BLOCK))
    tol = 1e-5 if dtype == torch.float32 else 2 * (sdpa.double() - attention_ref(q, k, v, visible=visible)).abs().max().item() + 1e-3
    diff = (out.double() - ref).abs().max().item()
    print(f"density={stats.density:.3f} max diff={diff:.2e} tol={tol:.2e}")
    assert diff <= tol
    if threshold == 1.0:
        torch.testing.assert_close(out.double(), sdpa.double(), rtol=0, atol=tol + 1e-5)


def test_dynamic_shapes_recompile_no_more_than_dense_compile():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    counter = torch._dynamo.testing.CompileCounter()
    lengths = [300, 356, 513, 200]
    dense = torch.compile(model, backend=counter)
    sparse = torch.compile(TinyTransformer().eval(), backend="xattn", options={"block_size": BLOCK, "min_seq_len": BLOCK, "dense_row_blocks": 0})
    with count_xattn_compiles() as xattn_compiles, torch.no_grad():
        for L in lengths:
            x, padding = torch.randn(1, L, 64), torch.ones(1, L, dtype=torch.bool)
            dense(x, padding)
            with xflex.sparsity(threshold=0.8) as stats:
                sparse(x, padding)
            assert len(stats.sparse_calls) == 3
    print("dense compiles", counter.frame_count, "xattn compiles", xattn_compiles.call_count)
    assert 1 <= xattn_compiles.call_count <= counter.frame_count
    torch._dynamo.reset()


def test_cpu_compiles_one_flex_kernel_per_length_bucket():
    """Many lengths, a bounded number of FlexAttention kernels on the CPU: the
    calls run padded to a power-of-two number of blocks (each length used to
    compile its own kernel)."""
    torch._dynamo.reset()
    config = xflex.Config(block_size=BLOCK, min_seq_len=BLOCK, dense_row_blocks=0, threshold=0.8)
    graphs = torch._dynamo.utils.counters["stats"]
    before = graphs["unique_graphs"]
    with xflex.sparsity() as stats:
        for length in (300, 333, 356, 420, 480, 512):  # 5-8 blocks of 64: one bucket of 8 blocks
            q = torch.randn(1, 2, length, 16)
            xflex.sparse_sdpa(q, q, q, is_causal=True, config=config)
    assert len(stats.sparse_calls) == 6
    assert graphs["unique_graphs"] - before == 1
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def compiled_causal_attention():
    """One compiled SDPA call with dynamic shapes, shared by the random-settings test."""
    torch._dynamo.reset()

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    yield torch.compile(attend, backend="xattn", dynamic=True, options={"block_size": BLOCK, "min_seq_len": BLOCK, "dense_row_blocks": 0})
    torch._dynamo.reset()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    q_len=st.sampled_from([100, 256]),
    groups=st.sampled_from([1, 2]),
    threshold=st.one_of(
        st.floats(0.05, 1.0), st.floats(-0.5, 1.5), st.lists(st.floats(0.1, 1.0), min_size=1, max_size=5)
    ),
    stride=st.one_of(st.sampled_from([4, 8, 16]), st.sampled_from([0, 3, 128])),
    keep_recent=st.one_of(st.integers(0, 200), st.just(-10)),
    enabled=st.booleans(),
)
def test_random_settings_give_the_right_answer_or_a_clear_error(
    compiled_causal_attention, q_len, groups, threshold, stride, keep_recent, enabled
):
    torch.manual_seed(q_len)
    q = torch.randn(1, 2 * groups, q_len, 16)
    k, v = torch.randn(1, 2, q_len, 16), torch.randn(1, 2, q_len, 16)
    settings_ = dict(threshold=threshold, stride=stride, keep_recent=keep_recent, enabled=enabled)
    try:
        with xflex.sparsity(**settings_) as stats:
            out = compiled_causal_attention(q, k, v)
    except ValueError as error:
        message = str(error)
        assert any(name in message for name in ("threshold", "stride", "keep_recent")), message
        return
    config = xflex.context.effective_config(xflex.Config(block_size=BLOCK, min_seq_len=BLOCK, dense_row_blocks=0))
    config = config.override(settings_)
    if stats.dense_calls:
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        return
    selected = xflex.plan(q, k, is_causal=True, config=config).selected
    visible = causal_visible(q_len, q_len) & blocks_to_elements(selected, q_len, q_len, BLOCK)
    torch.testing.assert_close(out.double(), attention_ref(q, k, v, visible=visible), rtol=1e-5, atol=1e-5)


def test_training_on_cpu_falls_back_to_dense_with_exact_gradients():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyTransformer()
    twin = TinyTransformer()
    twin.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="xattn", options={"block_size": BLOCK, "min_seq_len": BLOCK, "dense_row_blocks": 0})
    x, padding = torch.randn(1, 200, 64), torch.ones(1, 200, dtype=torch.bool)
    with xflex.sparsity(threshold=0.5) as stats:
        compiled(x, padding).square().mean().backward()
    twin(x, padding).square().mean().backward()
    assert [r.dense_reason for r in stats.records] == ["gradients on CPU (FlexAttention has no CPU backward)"] * 3
    for (name, p), t in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, t.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch._dynamo.reset()


def test_attention_dropout_in_training_stays_dense():
    torch._dynamo.reset()

    def attend(q):
        return F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)

    torch.compile(attend, backend="xattn")(torch.randn(1, 2, 128, 16))
    (entry,) = xflex.last_compile_report()
    assert not entry.rewritten and "dropout" in entry.reason
    torch._dynamo.reset()


@pytest.mark.skipif(not HAS_CUDA, reason="FlexAttention's backward needs CUDA")
@pytest.mark.parametrize("threshold", [1.0, 0.5])
@pytest.mark.parametrize("mask_kind", ["causal", "boolean", "bias"])
def test_gpu_gradients_through_the_sparse_path(threshold, mask_kind):
    """Gradients of the sparse op equal dense attention's restricted to the
    selected blocks (float64 reference), with GQA and a ragged end, and the
    backward runs FlexAttention's backward from the forward's saved
    log-sum-exp: the forward's kernel runs once."""
    torch.manual_seed(0)
    L = 700
    q = torch.randn(2, 4, L, 64, device="cuda", requires_grad=True)
    k, v = (torch.randn(2, 2, L, 64, device="cuda", requires_grad=True) for _ in range(2))
    visible = causal_visible(L, L).cuda().expand(2, 4, L, L)
    attn_mask, bias = None, None
    if mask_kind == "boolean":
        visible = visible & (torch.rand(2, 1, L, L, device="cuda") < 0.7) | torch.eye(L, dtype=torch.bool, device="cuda")
        attn_mask = visible
    elif mask_kind == "bias":
        bias = torch.randn(2, 4, L, L, device="cuda").masked_fill(~visible, float("-inf"))
        attn_mask = bias
    config = xflex.Config(block_size=128, min_seq_len=128, dense_row_blocks=0, threshold=threshold)
    call = dict(attn_mask=attn_mask, is_causal=mask_kind == "causal", enable_gqa=True)
    forward = xflex.planning.run_flex_attention
    with xflex.sparsity() as stats, mock.patch.object(xflex.planning, "run_flex_attention", wraps=forward) as runs:
        out = xflex.sparse_sdpa(q, k, v, config=config, **call)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad)
    assert stats.dense_calls == [] and runs.call_count == 1
    selected = xflex.plan(q, k, attn_mask, mask_kind == "causal", config=config).selected
    restricted = visible & blocks_to_elements(selected, L, L, 128)
    ref = attention_ref(q, k, v, visible=restricted, bias=None if bias is None else bias.masked_fill(~restricted, 0))
    expected = torch.autograd.grad(ref, (q, k, v), grad.double())
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need CUDA")
@torch.no_grad()
def test_reduce_overhead_graphs_the_model_and_the_op_still_follows_the_settings():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyTransformer().cuda().eval()
    x = torch.randn(2, 640, 64, device="cuda")
    padding = torch.ones(2, 640, dtype=torch.bool, device="cuda")
    expected = model(x, padding)
    # torch.compile takes a mode or options, not both: the settings come from sparsity().
    compiled = torch.compile(model, backend="xattn", mode="reduce-overhead")
    settings = dict(min_seq_len=128, dense_row_blocks=0)
    replay = torch.cuda.CUDAGraph.replay
    with mock.patch.object(torch.cuda.CUDAGraph, "replay", autospec=True, side_effect=replay) as replays:
        for _ in range(3):  # cudagraph trees warm up, record, then replay
            torch.compiler.cudagraph_mark_step_begin()
            with xflex.sparsity(threshold=1.0, **settings) as stats:
                full = compiled(x, padding).clone()
            assert len(stats.sparse_calls) == 3
            torch.testing.assert_close(full, expected, rtol=1e-4, atol=1e-4)
        torch.compiler.cudagraph_mark_step_begin()
        with xflex.sparsity(threshold=0.3, stride=16, **settings) as stats:
            sparse = compiled(x, padding).clone()
        assert stats.density < 1.0 and not torch.allclose(sparse, expected, rtol=1e-3, atol=1e-3)
        torch.compiler.cudagraph_mark_step_begin()
        with xflex.sparsity(enabled=False) as stats:
            off = compiled(x, padding).clone()
        assert len(stats.dense_calls) == 3
        torch.testing.assert_close(off, expected, rtol=1e-4, atol=1e-4)
    assert replays.call_count > 0
    torch._dynamo.reset()


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need CUDA")
def test_capturing_the_op_in_a_cuda_graph_raises_clearly():
    q = torch.randn(1, 2, 512, 64, device="cuda")
    config = xflex.Config(min_seq_len=128)
    xflex.sparse_sdpa(q, q, q, config=config)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), pytest.raises(RuntimeError, match="reduce-overhead"):
        xflex.sparse_sdpa(q, q, q, config=config)
