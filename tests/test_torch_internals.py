"""Every private PyTorch API xflex relies on (``xflex.torch_internals``) still
exists and behaves as xflex uses it: a torch release that removes or changes
one fails here, by name."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from reference import attention_ref, causal_visible

from xflex import torch_internals


def _missing(name: str) -> str:
    return f"torch {torch.__version__} no longer has {name}, which xflex.torch_internals uses"


def test_sdpa_appears_in_graphs_as_the_c_function():
    assert callable(torch_internals.SDPA_C_FUNCTION), _missing("torch._C._nn.scaled_dot_product_attention")
    q = torch.randn(1, 2, 8, 4)
    torch.testing.assert_close(torch_internals.SDPA_C_FUNCTION(q, q, q), F.scaled_dot_product_attention(q, q, q))


def test_eager_dispatch_state_restores_autograd_inside_a_custom_op():
    for name in ("_ForceDispatchKeyGuard", "_dispatch_tls_local_include_set", "_dispatch_tls_local_exclude_set"):
        assert hasattr(torch._C, name), _missing(f"torch._C.{name}")

    @torch.library.custom_op("xflex_test::grad_inside", mutates_args=())
    def grad_inside(x: torch.Tensor) -> torch.Tensor:
        # A custom op's kernel runs below autograd; the guard brings it back.
        with torch_internals.eager_dispatch_state(), torch.enable_grad():
            y = x.detach().requires_grad_()
            return torch.autograd.grad((y * y).sum(), y)[0]

    x = torch.arange(3.0)
    torch.testing.assert_close(grad_inside(x), 2 * x)


def test_recompile_limits_patch_dynamo_config():
    before = torch._dynamo.config.recompile_limit
    with torch_internals.recompile_limits(123, 4567):
        assert (torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit) == (123, 4567)
    assert torch._dynamo.config.recompile_limit == before


def test_inductor_option_names_and_modes():
    names = torch_internals.inductor_option_names()
    assert {"max_autotune", "triton.cudagraphs"} <= names, _missing("torch._inductor.list_options() with dotted names")
    assert torch_internals.inductor_mode_options("max-autotune")["max_autotune"] is True
    assert callable(torch_internals.compile_fx), _missing("torch._inductor.compile_fx.compile_fx")


def test_mark_dynamic_and_compile_seconds():
    torch_internals.mark_dynamic_if_possible(torch.randn(4, 4), 1)
    assert torch_internals.compile_seconds() >= 0.0


def test_public_replacement_exists():
    assert callable(torch.compiler.disable)  # warmup's hooks (was torch._dynamo.disable)


def test_context_parallel_is_detected_by_its_sdpa_patch(tmp_path):
    """context_parallel() replaces F.scaled_dot_product_attention with a wrapper
    from its own module (a one-process gloo group is enough to enter it)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    assert not torch_internals.sdpa_patched_by_context_parallel()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        q = torch.randn(1, 2, 8, 4)
        with context_parallel(init_device_mesh("cpu", (1,)), buffers=[q], buffer_seq_dims=[2]):
            assert torch_internals.sdpa_patched_by_context_parallel(), (
                f"torch {torch.__version__}: context_parallel() no longer patches F.scaled_dot_product_attention "
                "with a function of torch.distributed.tensor.experimental"
            )
        assert not torch_internals.sdpa_patched_by_context_parallel()
    finally:
        dist.destroy_process_group()


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 3]),
    length=st.integers(1, 300),
    head_dim=st.sampled_from([8, 16]),
    mask_kind=st.sampled_from(["causal", "boolean", "bias"]),
)
def test_flex_backward_graph_from_saved_lse_matches_autograd(batch, kv_heads, group, length, head_dim, mask_kind):
    """The traced backward HOP, run eagerly (its plain-math implementation, so
    every block visible), equals autograd through the float64 reference, from
    the reference's own out and natural-log lse: the HOP's contract as
    flex_attention_backward_graph assumes it (tests/test_robustness.py runs it
    compiled, block-sparse, on CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from xflex.attention.masks import Mod, add_bias, causal_mask, lookup_mask

    torch.manual_seed(length)
    heads = kv_heads * group
    q = torch.randn(batch, heads, length, head_dim, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(batch, kv_heads, length, head_dim, dtype=torch.float64, requires_grad=True) for _ in range(2))
    visible = causal_visible(length, length).expand(batch, heads, length, length)
    mask, score, bias = Mod(causal_mask(0)), None, None
    if mask_kind == "boolean":
        visible = (torch.rand(batch, heads, length, length) < 0.6) | torch.eye(length, dtype=torch.bool)
        mask = Mod(lookup_mask, (visible,))
    elif mask_kind == "bias":
        bias = torch.randn(batch, heads, length, length, dtype=torch.float64)
        score = Mod(add_bias, (bias,))
    out = attention_ref(q, k, v, visible=visible, bias=bias)
    logits = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)) / math.sqrt(head_dim)
    logits = logits + (0 if bias is None else bias)
    lse = torch.logsumexp(logits.masked_fill(~visible, float("-inf")), -1)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, (q, k, v), grad)

    everything = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx >= 0, None, None, length, length, device="cpu")
    tensors = [t.detach() for t in (q, k, v, out, lse)] + [grad]
    buffers = dict(mask_buffers=mask.buffers, score_buffers=() if score is None else score.buffers)
    with torch.no_grad():  # as in the op's backward
        graph = torch_internals.flex_attention_backward_graph(
            *tensors, block_mask=everything, mask_fn=mask.fn, score_fn=None if score is None else score.fn,
            scale=1 / math.sqrt(head_dim), **buffers,
        )
    got = graph(*torch_internals.flex_attention_backward_inputs(*tensors, block_mask=everything, **buffers))
    for name, g, want in zip("qkv", got, expected):
        torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-9, msg=f"d{name}")
