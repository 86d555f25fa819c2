"""The FLASH attention kernel (FlexAttention's FlashAttention-4 backend) on
xflex's own BlockMasks, against plain-torch attention with the selected
blocks applied: causal and bidirectional calls (the latter with no mask of
their own), GQA, ragged lengths, partial and full blocks. Needs a Hopper GPU
and flash-attn-4; skipped elsewhere."""

import math

import pytest
import torch
from reference import attention_ref, blocks_to_elements, causal_visible

import xflex
from xflex.attention.flex import flash_unsupported_reason

_CUDA = torch.cuda.is_available()
_REASON = (
    "needs CUDA"
    if not _CUDA
    else flash_unsupported_reason(
        torch.empty(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16),
        key_length=1,
        value_head_dim=128,
        block_size=128,
        captures_tensors=False,
        needs_grad=False,
    )
)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=f"the FLASH kernel cannot run here: {_REASON}")]


@pytest.mark.parametrize(
    "causal, heads, kv_heads, length, head_dim",
    [
        (True, 8, 8, 4096, 128),
        (True, 8, 2, 3000, 128),  # GQA 4:1, ragged
        (False, 8, 8, 4096, 128),  # no mask: sparsity lives in the kv indices only
        (False, 4, 1, 2500, 64),
    ],
)
def test_flash_kernel_computes_exactly_the_selected_blocks(causal, heads, kv_heads, length, head_dim):
    gen = torch.Generator(device="cuda").manual_seed(length)
    q = torch.randn(1, heads, length, head_dim, generator=gen, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, length, head_dim, generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, kv_heads, length, head_dim, generator=gen, device="cuda", dtype=torch.bfloat16)
    config = xflex.Config(method="threshold", threshold=0.6, min_seq_len=0, break_even=False, attention_kernel="flash")
    plan = xflex.plan(q, k, is_causal=causal, config=config)
    assert plan.kernel == "flash"
    density = plan.density()
    assert 0.05 < density < 0.95, f"density {density}: the test needs a real selection"
    out = plan.attend(q, k, v)
    visible = causal_visible(length, length).cuda() if causal else torch.ones(1, 1, length, length, dtype=torch.bool, device="cuda")
    selected = blocks_to_elements(plan.selected, length, length, 128)
    ref = attention_ref(q, k, v, visible=visible & selected)
    # bf16 inputs and output: the tolerance of dense bf16 attention against the same fp64 reference.
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=heads != kv_heads)
    tol = 2 * (dense.double() - attention_ref(q, k, v, visible=visible)).abs().max().item() + 1e-3
    diff = (out.double() - ref).abs().max().item()
    print(f"density {density:.3f}: max diff {diff:.2e} (tol {tol:.2e}); mean {(out.double() - ref).abs().mean().item():.2e}")
    assert diff <= tol
    assert math.isfinite(diff)


def test_flash_refuses_what_it_cannot_run():
    q = torch.randn(1, 2, 1024, 128, device="cuda", dtype=torch.bfloat16)
    config = xflex.Config(min_seq_len=0, attention_kernel="flash")
    mask = torch.ones(1024, 1024, dtype=torch.bool, device="cuda").tril()
    with pytest.raises(ValueError, match="attention_kernel='flash' cannot run"):
        xflex.plan(q, q, mask, config=config)  # the mask is a captured tensor
    with pytest.raises(ValueError, match="attention_kernel='flash' cannot run"):
        xflex.plan(q.float(), q.float(), is_causal=True, config=config)


def test_auto_keeps_triton_outside_what_flash_was_tested_with():
    """Batch > 1 and query length != key length were not checked against the
    reference with FLASH: ``"auto"`` runs them on Triton."""
    config = xflex.Config(min_seq_len=0, break_even=False)
    batched = torch.randn(2, 2, 1024, 128, device="cuda", dtype=torch.bfloat16)
    assert xflex.plan(batched, batched, is_causal=True, config=config).kernel == "triton"
    q = torch.randn(1, 2, 512, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 1024, 128, device="cuda", dtype=torch.bfloat16)
    assert xflex.plan(q, k, config=config).kernel == "triton"
    assert xflex.plan(k, k, is_causal=True, config=config).kernel == "flash"
