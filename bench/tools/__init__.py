"""Kernel investigation tools: the scorer's GEMM ceiling, its tile sweep and its
Hopper machine code (``python -m bench.tools.sass_report``)."""
