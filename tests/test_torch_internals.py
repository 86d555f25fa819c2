"""Every private PyTorch API xflex relies on (``xflex.torch_internals``) still
exists and behaves as xflex uses it: a torch release that removes or changes
one fails here, by name."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

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
