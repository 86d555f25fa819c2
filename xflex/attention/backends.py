"""Which implementation each stage runs: one vocabulary for all of them."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal, get_args

import torch

__all__ = ["BACKENDS", "Backend", "interpreting", "triton_installed", "uses_triton", "validate_backend"]

Backend = Literal["auto", "torch", "triton", "gluon"]
"""``"torch"``: plain torch ops (the references; what runs on the CPU).
``"triton"``: the Triton kernels (CUDA, or Triton's CPU interpreter under
``TRITON_INTERPRET=1``). ``"gluon"``: the Gluon kernel where a stage has one
(the Hopper scorer; an error where it cannot run), Triton elsewhere.
``"auto"``: Triton kernels on CUDA when Triton is installed, the Gluon scorer
for large Hopper calls, plain torch otherwise."""

BACKENDS: tuple[str, ...] = get_args(Backend)


def validate_backend(backend: object) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, but got {backend!r}")


@functools.cache
def triton_installed() -> bool:
    """Triton is an optional dependency (``pip install 'xflex[triton]'``)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def uses_triton(backend: Backend, tensor: torch.Tensor) -> bool:
    """Whether a stage runs its Triton (or Gluon) kernel on ``tensor``'s device."""
    validate_backend(backend)
    if backend == "auto":
        return tensor.is_cuda and triton_installed()
    return backend != "torch"
