"""pytest-benchmark: xflex attention and cuDNN SDPA on the same inputs, in the
same run (ratios, not absolute times, are what these shared GPUs can tell).

    pytest bench/test_bench_attention.py --benchmark-columns=median,iqr
"""

import pytest
import torch
import torch.nn.functional as F

import xflex
from xflex.benchmark.inputs import llm_like_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")
LENGTHS = [8192, 32768]


def _cuda_timed(benchmark, fn):
    def run():
        fn()
        torch.cuda.synchronize()

    run()  # compile and warm up outside the timed rounds
    benchmark.pedantic(run, rounds=20, warmup_rounds=3)


@pytest.fixture(scope="module", params=LENGTHS, ids=lambda L: f"L{L // 1024}K")
def inputs(request):
    return llm_like_inputs(request.param)


def test_cudnn_dense(benchmark, inputs):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = inputs
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        _cuda_timed(benchmark, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("stride", [8, 16])
def test_xflex_sparse(benchmark, inputs, stride):
    q, k, v = inputs
    config = xflex.Config(threshold=0.9, stride=stride)
    with xflex.sparsity() as stats:
        xflex.sparse_sdpa(q, k, v, is_causal=True, config=config)
    benchmark.extra_info["density"] = stats.density
    _cuda_timed(benchmark, lambda: xflex.sparse_sdpa(q, k, v, is_causal=True, config=config))
