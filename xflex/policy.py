"""Which calls run dense, and why: decided per call when it runs, from the
actual inputs, the active settings and, on GPUs whose costs were measured,
whether sparse attention would pay (no graph guards, no recompiles)."""

from __future__ import annotations

import dataclasses

import torch

from .attention import CallPattern, KernelName, SdpaArgs, attention_kernel
from .config import Config
from .planning import Plan, probe_density

__all__ = [
    "BreakEven",
    "MEASURED_BREAK_EVEN",
    "break_even",
    "dense_forecast_reason",
    "dense_reason",
    "dense_selection_reason",
    "device_kind",
]

_SPARSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class BreakEven:
    """Where sparse attention stops paying, on one GPU kind with one attention kernel.

    Attributes:
        min_keys: calls with fewer keys run dense (their fixed cost of scoring,
            selection and launches exceeds what sparsity can save).
        max_density: selections denser than this run dense: the kernel's
            speed per computed block relative to dense SDPA.
    """

    min_keys: int
    max_density: float


# (device_kind(), attention kernel) -> BreakEven, from `xflex bench` and
# `python -m bench.attention_kernels` (bench/RESULTS.md, "Break-even"). The
# density check comes after scoring, so it falls back when attending the
# selection costs more than dense attention: density > the kernel's cost per
# block relative to cuDNN. Triton: 0.62-0.71 at densities >= 0.5, so 0.6.
# FLASH: about 1 (the whole op ran 0.99-1.12x of dense at densities 0.91-0.98
# from 32K keys), so no density fallback. At 8K keys the op ran at 0.71-1.01x
# of dense on LLM-like input and 2.3-3.3x at 32K: calls below 16K keys run
# dense. GPU kinds not listed: only min_seq_len decides. Before scoring, the
# selection's density on a few probe rows forecasts selections that would
# fall back anyway, so that they skip the scoring (dense_forecast_reason).
MEASURED_BREAK_EVEN: dict[tuple[str, str], BreakEven] = {
    ("NVIDIA H200", "triton"): BreakEven(min_keys=16384, max_density=0.6),
    ("NVIDIA H200", "flash"): BreakEven(min_keys=16384, max_density=1.0),
}


def device_kind(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` for a GPU, the device type otherwise."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def break_even(device: torch.device, kernel: str) -> BreakEven | None:
    """The measured break-even of this device kind and kernel, or None."""
    return MEASURED_BREAK_EVEN.get((device_kind(device), kernel))


def dense_reason(args: SdpaArgs, config: Config, needs_grad: bool) -> str | None:
    """Why this call must run dense SDPA, or None when it can run sparse
    (decided before anything is scored).

    Example:
        >>> q = torch.randn(1, 2, 64, 32)
        >>> dense_reason(SdpaArgs(q, q, q), Config(), needs_grad=False)
        'query length 64 below one block (128), e.g. a decode step'
    """
    query, key = args.query, args.key
    if not config.enabled:
        return "sparsity disabled"
    if query.dim() != 4 or key.dim() != 4:
        return f"query/key are {query.dim()}-D/{key.dim()}-D, sparse path takes 4-D (B, H, L, D)"
    if query.device.type not in ("cpu", "cuda"):
        return f"device {query.device.type} has no FlexAttention path"
    if query.dtype not in _SPARSE_DTYPES:
        return f"dtype {query.dtype} (sparse path takes fp16/bf16/fp32)"
    if args.dropout_p != 0.0:
        return "attention dropout"
    if needs_grad and query.device.type == "cpu":
        return "gradients on CPU (FlexAttention has no CPU backward)"
    if query.shape[2] < config.block_size:
        return f"query length {query.shape[2]} below one block ({config.block_size}), e.g. a decode step"
    if key.shape[2] < config.min_seq_len:
        return f"key length {key.shape[2]} below min_seq_len={config.min_seq_len}"
    if config.break_even and MEASURED_BREAK_EVEN:
        kernel = _call_kernel(args, config, needs_grad)
        limits = break_even(query.device, kernel)
        if limits is not None and key.shape[2] < limits.min_keys:
            return f"key length {key.shape[2]} below this device's break-even length {limits.min_keys} ({kernel} kernel)"
    return None


def _call_kernel(args: SdpaArgs, config: Config, needs_grad: bool) -> KernelName:
    return attention_kernel(
        config.attention_kernel,
        args.query,
        key_length=args.key.shape[2],
        value_head_dim=args.value.shape[-1],
        block_size=config.block_size,
        captures_tensors=args.attn_mask is not None,
        needs_grad=needs_grad,
    )


def dense_forecast_reason(args: SdpaArgs, pattern: CallPattern, config: Config, needs_grad: bool, call_name: str = "") -> str | None:
    """Why this call should run dense before it is scored: its selection on
    ``config.probe_blocks`` probe query blocks is denser than the break-even
    density (None: score it). A forecast on a few rows (one host
    synchronisation); :func:`dense_selection_reason` still checks the whole
    selection. Only for the antidiagonal method, whose rule the probes replay.

    Example:
        >>> from xflex.attention import call_pattern
        >>> q = torch.randn(1, 2, 512, 64)
        >>> dense_forecast_reason(SdpaArgs(q, q, q), call_pattern(q, q, None, False, 128), Config(), False) is None
        True
    """
    limits = break_even(args.query.device, _call_kernel(args, config, needs_grad)) if config.break_even else None
    if limits is None or limits.max_density >= 1.0 or config.method != "antidiagonal":
        return None
    density = probe_density(args.query, args.key, pattern, config, call_name, scale=args.scale)
    if density > limits.max_density:
        return f"probe rows' selection density {density:.2f} above this device's break-even {limits.max_density:.2f}"
    return None


def dense_selection_reason(plan: Plan, config: Config, device: torch.device) -> str | None:
    """Why this call's selection is better run dense (denser than the GPU's
    break-even density), or None. Reads the density back from the GPU (one
    synchronisation)."""
    limits = break_even(device, plan.kernel) if config.break_even else None
    if limits is None:
        return None
    density = plan.density()
    if density > limits.max_density:
        return f"selection density {density:.2f} above this device's break-even {limits.max_density:.2f} ({plan.kernel} kernel)"
    return None
