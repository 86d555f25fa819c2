"""pytest-benchmark suite for XAttention's block estimate (Xu et al., ICML
2025): Triton scoring, selection, the torch reference and dense cuDNN SDPA,
on the synthetic inputs of ``bench/scoring.py``. GPU only.

Run ``pytest bench/test_bench_scoring.py`` (``--benchmark-only`` to skip
nothing, ``--benchmark-compare`` against a saved run). Each scoring case is
checked against the reference before it is timed.
"""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is an optional dependency (pip install 'xflex[triton]')")
if not torch.cuda.is_available():
    pytest.skip("the benchmarks time GPU kernels: they need CUDA", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
import scoring  # noqa: E402

_LENGTHS = [8 * 1024, 32 * 1024]
_ROUNDS, _WARMUP_ROUNDS = 10, 2


@pytest.fixture(scope="module", params=_LENGTHS, ids=lambda n: f"L{n // 1024}K")
def inputs(request):
    return scoring.llm_like_inputs(request.param)


def _bench(benchmark, fn):
    """Time ``fn`` on the GPU: each round waits for its kernels to finish."""

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return benchmark.pedantic(run, rounds=_ROUNDS, warmup_rounds=_WARMUP_ROUNDS, iterations=1)


@pytest.mark.gpu
@pytest.mark.parametrize("stride", scoring._STRIDES)
def test_triton_scoring(benchmark, inputs, stride):
    q, k, _ = inputs
    got = scoring.score(q, k, stride)
    want = scoring.reference_score(q, k, stride)
    print(f"max diff {(got - want).abs().max().item():.3g}")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    benchmark.group = f"scoring L={q.shape[2]}"
    _bench(benchmark, lambda: scoring.score(q, k, stride))


@pytest.mark.gpu
@pytest.mark.parametrize("stride", scoring._STRIDES)
def test_torch_reference_scoring(benchmark, inputs, stride):
    q, k, _ = inputs
    benchmark.group = f"scoring L={q.shape[2]}"
    _bench(benchmark, lambda: scoring.reference_score(q, k, stride))


@pytest.mark.gpu
@pytest.mark.parametrize("stride", scoring._STRIDES)
def test_selection(benchmark, inputs, stride):
    q, k, _ = inputs
    scores = scoring.score(q, k, stride)
    benchmark.group = f"selection L={q.shape[2]}"
    selected, _, visible = _bench(benchmark, lambda: scoring.select(scores, q.shape[2], k.shape[2]))
    benchmark.extra_info["density"] = selected.sum().item() / (visible.sum().item() * q.shape[1])


@pytest.mark.gpu
def test_dense_attention(benchmark, inputs):
    q, k, v = inputs
    name, dense = scoring.dense_attention(q, k, v)
    benchmark.group = f"scoring L={q.shape[2]}"
    benchmark.extra_info["backend"] = name
    _bench(benchmark, dense)
