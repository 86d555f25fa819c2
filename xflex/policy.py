"""Which calls run dense, and why: decided per call when it runs, from the
actual inputs, the active settings and, on GPUs whose costs were measured,
whether sparse attention would pay (no graph guards, no recompiles)."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch

from .attention import CallPattern, KernelName, SdpaArgs, attention_kernel
from .config import Config
from .planning import Plan, density_of_counts, probe_density

__all__ = [
    "ANONYMOUS_CALL",
    "BreakEven",
    "DENSITY_HISTORY",
    "DensityCheck",
    "DensityHistory",
    "MEASURED_BREAK_EVEN",
    "RECHECK_EVERY",
    "break_even",
    "dense_reason",
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
# FLASH: 1.0-1.26, less a scoring share of 7-25%: swept without the table at
# 16K-64K keys, it ran 1.03-1.86x of dense up to density 0.90 and 0.96-1.07x
# at 0.93-0.99, so 0.92 (a dense call runs 0.98-1.02x). At 8K keys the op ran at 0.71-1.01x
# of dense on LLM-like input and 2.3-3.3x at 32K: calls below 16K keys run
# dense. GPU kinds not listed: only min_seq_len decides. Before scoring, the
# selection's density on a few probe rows forecasts selections that would
# fall back anyway, so that they skip the scoring, and each call site's
# history spares later calls both (DensityCheck).
MEASURED_BREAK_EVEN: dict[tuple[str, str], BreakEven] = {
    ("NVIDIA H200", "triton"): BreakEven(min_keys=16384, max_density=0.6),
    ("NVIDIA H200", "flash"): BreakEven(min_keys=16384, max_density=0.92),
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


# Calls a site runs dense on its history before its probe rows are read again.
RECHECK_EVERY = 16
# The name of eager sparse_sdpa calls that were given none: such calls may
# come from any layer, so they keep no history (each is forecast and checked).
ANONYMOUS_CALL = "sparse_sdpa"


class _CallSite:
    """What one call site's last selection cost: its density, read back to the
    host either at once (a forecast, a checked selection) or without waiting
    (an event the next call of the site polls)."""

    def __init__(self) -> None:
        self.density: float | None = None
        self.dense_runs = 0  # calls run dense on the history since it was measured
        self._pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None

    def last_density(self) -> float | None:
        """The latest density read back (a pending read-back that has not landed is not waited for)."""
        if self._pending is not None:
            counts, event = self._pending
            if event is None or event.query():
                self.density = density_of_counts(counts)
                self._pending = None
        return self.density

    def record(self, density: float) -> None:
        self.density, self._pending = density, None

    def record_async(self, counts: torch.Tensor) -> None:
        if not counts.is_cuda:
            self._pending = (counts, None)
            return
        event = torch.cuda.Event()
        self._pending = (counts.to("cpu", non_blocking=True), event)
        event.record()


class DensityHistory:
    """Per call site, the density of its last selection, so that a site whose
    selections are too dense to pay runs dense without scoring, and a site
    whose selections pay skips the forecast and every host synchronisation.
    A site is the call's name (the backend names calls by module path; eager
    callers pass ``name``, and unnamed eager calls keep no history), settings,
    kernel, device, heads, mask and length bucket (the next power of two).
    Bounded: the least recent sites go first."""

    def __init__(self, max_sites: int = 4096) -> None:
        self._sites: OrderedDict[tuple, _CallSite] = OrderedDict()
        self._max_sites = max_sites

    def site(self, key: tuple) -> _CallSite:
        site = self._sites.pop(key, None) or _CallSite()
        self._sites[key] = site
        if len(self._sites) > self._max_sites:
            self._sites.popitem(last=False)
        return site

    def clear(self) -> None:
        """Forget every site (the next call of each reads its probe rows again)."""
        self._sites.clear()


DENSITY_HISTORY = DensityHistory()


def _site_key(args: SdpaArgs, config: Config, kernel: str, call_name: str) -> tuple:
    mask = args.attn_mask
    mask_kind = None if mask is None else (mask.dtype, tuple(mask.shape[:-2]))
    lengths = tuple(n.bit_length() for n in (args.query.shape[2], args.key.shape[2]))
    heads = (args.query.shape[1], args.key.shape[1])
    return (call_name, config.to_key(), kernel, str(args.query.device), heads, lengths, args.is_causal, mask_kind)


class DensityCheck:
    """The break-even density check of one call, before and after scoring.

    Where the device's break-even density applies (``MEASURED_BREAK_EVEN``,
    below 1.0 for the call's kernel), a call runs dense SDPA when its selection
    would be denser. Its site's :class:`DensityHistory` decides first: a site
    whose last selection was too dense runs dense at once (its probe rows are
    read again every ``RECHECK_EVERY`` such calls); a site whose last selection
    paid is scored and attended without waiting for the GPU, its density read
    back for the next call. A site without history, or due a re-check,
    forecasts the density from ``config.probe_blocks`` probe query blocks
    (threshold method; one synchronisation) and checks the whole selection
    after scoring (another).

    Example:
        >>> from xflex.attention import call_pattern
        >>> q = torch.randn(1, 2, 512, 64)
        >>> check = DensityCheck(SdpaArgs(q, q, q), Config(), needs_grad=False)
        >>> check.before_scoring(call_pattern(q, q, None, False, 128)) is None   # no break-even on the CPU
        True
    """

    def __init__(self, args: SdpaArgs, config: Config, needs_grad: bool, call_name: str = "") -> None:
        self._args, self._config, self._call_name = args, config, call_name
        self._kernel = _call_kernel(args, config, needs_grad)
        limits = break_even(args.query.device, self._kernel) if config.break_even else None
        self._max_density = None if limits is None or limits.max_density >= 1.0 else limits.max_density
        self._site = None
        if self._max_density is not None:
            # Unnamed calls get a site of their own each time: forecast and checked, remembered by no one.
            anonymous = call_name == ANONYMOUS_CALL
            self._site = _CallSite() if anonymous else DENSITY_HISTORY.site(_site_key(args, config, self._kernel, call_name))
        self._wait_for_density = True

    def _above(self, what: str, density: float, note: str = "") -> str | None:
        if density <= self._max_density:
            return None
        return f"{what} density {density:.2f} above this device's break-even {self._max_density:.2f} ({self._kernel} kernel{note})"

    def before_scoring(self, pattern: CallPattern) -> str | None:
        """Why the call should run dense before it is scored, or None: score it."""
        site = self._site
        if site is None:
            return None
        last = site.last_density()
        if last is not None and last <= self._max_density:
            self._wait_for_density = False
            return None
        if last is not None and site.dense_runs < RECHECK_EVERY:
            site.dense_runs += 1
            return self._above("this call site's last selection", last, f"; re-checked every {RECHECK_EVERY} calls")
        site.dense_runs = 0
        if self._config.method != "threshold":  # the probes replay the threshold rule only
            return None
        args = self._args
        density = probe_density(args.query, args.key, pattern, self._config, self._call_name, scale=args.scale)
        site.record(density)
        return self._above("probe rows' selection", density)

    def after_scoring(self, plan: Plan) -> str | None:
        """Why the scored call should still run dense (its selection is too dense), or None."""
        if self._site is None:
            return None
        if not self._wait_for_density:
            self._site.record_async(plan.block_counts())
            return None
        density = plan.density()
        self._site.record(density)
        return self._above("selection", density)
