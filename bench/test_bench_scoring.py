"""pytest-benchmark suite for XAttention's block estimate (Xu et al., ICML
2025): Triton scoring + selection against dense cuDNN SDPA on the same inputs
in the same run, for L = 8K..128K and S = 8, 16 (issue 4's grid), plus the
pieces (selection kernel vs torch ops, the torch reference scorer). GPU only.

    pytest bench/test_bench_scoring.py --benchmark-columns=median,iqr

Each row's ``extra_info`` holds ``ratio_to_dense`` (median over the dense
median of its length, measured in this run) and the selection density. Each
scoring case is checked against the reference before it is timed.
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is an optional dependency (pip install 'xflex[triton]')")
if not torch.cuda.is_available():
    pytest.skip("the benchmarks time GPU kernels: they need CUDA", allow_module_level=True)

from bench import scoring  # noqa: E402
from bench.common import best_dense_sdpa, time_ms  # noqa: E402
from xflex.benchmark.inputs import llm_like_inputs  # noqa: E402

_K = 1024
_LENGTHS = [8 * _K, 16 * _K, 32 * _K, 64 * _K, 128 * _K]
_REFERENCE_MAX_LEN = 32 * _K  # the plain-torch scorer runs out of memory beyond
_ROUNDS, _WARMUP_ROUNDS = 10, 2


@pytest.fixture(scope="module", params=_LENGTHS, ids=lambda n: f"L{n // _K}K")
def inputs(request):
    q, k, v = llm_like_inputs(request.param)
    _, dense = best_dense_sdpa(q, k, v)
    return q, k, v, time_ms(dense)


def _bench(benchmark, fn, dense_ms):
    """Time ``fn`` on the GPU (each round waits for its kernels) and record its
    ratio to the dense time of the same inputs."""

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(run, rounds=_ROUNDS, warmup_rounds=_WARMUP_ROUNDS, iterations=1)
    benchmark.extra_info["ratio_to_dense"] = round(benchmark.stats.stats.median * 1e3 / dense_ms, 4)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("stride", scoring._STRIDES)
def test_scoring_and_selection(benchmark, inputs, stride):
    """What finding the sparsity costs a call: Triton scores -> kv blocks."""
    q, k, _, dense_ms = inputs
    if q.shape[2] <= _REFERENCE_MAX_LEN:
        torch.testing.assert_close(scoring.score(q, k, stride), scoring.reference_score(q, k, stride), rtol=1e-4, atol=1e-5)
    benchmark.group = f"scoring+selection L={q.shape[2] // _K}K"
    blocks, visible = _bench(benchmark, lambda: scoring.select(scoring.score(q, k, stride), q, k), dense_ms)
    benchmark.extra_info["density"] = round(blocks.selected.sum().item() / (visible.sum().item() * q.shape[1]), 4)


@pytest.mark.gpu
@pytest.mark.parametrize("stride", scoring._STRIDES)
def test_triton_scoring(benchmark, inputs, stride):
    q, k, _, dense_ms = inputs
    benchmark.group = f"scoring L={q.shape[2] // _K}K"
    _bench(benchmark, lambda: scoring.score(q, k, stride), dense_ms)


@pytest.mark.gpu
@pytest.mark.parametrize("stride", scoring._STRIDES)
def test_torch_reference_scoring(benchmark, inputs, stride):
    q, k, _, dense_ms = inputs
    if q.shape[2] > _REFERENCE_MAX_LEN:
        pytest.skip("the plain-torch scorer needs the whole reduced matrix in memory")
    benchmark.group = f"scoring L={q.shape[2] // _K}K"
    _bench(benchmark, lambda: scoring.reference_score(q, k, stride), dense_ms)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_selection(benchmark, inputs, backend):
    q, k, _, dense_ms = inputs
    scores = scoring.score(q, k, 16)
    benchmark.group = f"selection L={q.shape[2] // _K}K"
    blocks, _ = _bench(benchmark, lambda: scoring.select(scores, q, k, backend=backend), dense_ms)
    reference, _ = scoring.select(scores, q, k, backend="torch")
    benchmark.extra_info["blocks_unlike_torch"] = (blocks.selected != reference.selected).sum().item()


@pytest.mark.gpu
def test_dense_attention(benchmark, inputs):
    q, k, v, dense_ms = inputs
    name, dense = best_dense_sdpa(q, k, v)
    benchmark.group = f"scoring+selection L={q.shape[2] // _K}K"
    benchmark.extra_info["backend"] = name
    _bench(benchmark, dense, dense_ms)
