"""Test-session setup shared by every module."""

import os

import torch

# Without a GPU, Triton kernels run in its CPU interpreter. Triton reads the
# variable at its first import, which the first module importing xflex does.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
