"""Benchmark inputs and the ``xflex bench`` runner (GPU): input families with
the structures that make attention sparse, and the op timed against dense SDPA."""

from .inputs import FAMILIES, Family, llm_like_inputs, make_inputs

__all__ = ["FAMILIES", "Family", "llm_like_inputs", "make_inputs"]
