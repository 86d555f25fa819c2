"""``xflex bench``: the whole xflex op against the best dense SDPA (cuDNN and
FlashAttention, timed in the same run on the same GPU), by input family and
length, with its density, the cost of finding the sparsity, and the speed of
each computed block relative to dense attention."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from ..attention import attention_kernel
from ..attention.scoring import Pairing, Precision
from ..config import Config, ScoringReduction
from ..context import sparsity
from ..op import sparse_sdpa
from ..planning import plan
from .inputs import FAMILIES, make_inputs
from .timing import dense_sdpa, time_ms

__all__ = ["HEADER", "LENGTHS", "SpeedRow", "describe_gpu", "markdown_row", "markdown_table", "parse_length", "plot", "run"]

LENGTHS = ("8K", "32K", "128K")


@dataclasses.dataclass
class SpeedRow:
    """One (family, length, method, kernel) measurement; times in ms (median)."""

    family: str
    length: int
    method: str
    kernel: str
    cudnn_ms: float
    flash_ms: float
    xflex_ms: float
    plan_ms: float  # scoring + selection (+ probes for the adaptive method)
    density: float | None  # None: the call ran dense
    dense_reason: str | None
    backward: bool

    @property
    def speedup(self) -> float:
        """Against the best dense SDPA of the same run."""
        return min(self.cudnn_ms, self.flash_ms) / self.xflex_ms

    @property
    def block_efficiency(self) -> float | None:
        """Dense time per block over sparse-attention time per computed block (1: cuDNN's speed)."""
        attend_ms = self.xflex_ms - self.plan_ms
        if self.density is None or attend_ms <= 0:
            return None
        return min(self.cudnn_ms, self.flash_ms) * self.density / attend_ms


def _with_backward(forward: Callable[[], torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        forward().backward(grad)

    return run


def run(
    families: Sequence[str],
    lengths: Sequence[int],
    *,
    methods: Sequence[str] = ("threshold",),
    kernels: Sequence[str] = ("auto",),
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    threshold: float = 0.95,
    stride: int = 8,
    scorer: Pairing = Config.scorer,
    scoring_precision: Precision = Config.scoring_precision,
    scoring_reduction: ScoringReduction = Config.scoring_reduction,
    vertical_mass: float = Config.vertical_mass,
    slash_mass: float = Config.slash_mass,
    relative_floor: float = Config.relative_floor,
    max_alone_ratio: float = Config.max_alone_ratio,
    sharpness: float | None = None,
    seed: int = 0,
    break_even: bool = True,
    backward: bool = False,
    rep_ms: int = 100,
    report: Callable[[SpeedRow], None] = lambda row: None,
) -> list[SpeedRow]:
    """Time every (family, length, method, kernel) on the current CUDA GPU.

    ``sharpness`` scales every family's planted bonuses (``make_inputs``;
    None: each family's own); ``seed`` draws the inputs. Correctness is checked first for each family and length: at threshold 1.0
    the op must equal cuDNN SDPA to bf16 tolerance. The op is timed as a
    repeated call of one named call site, so from its second call its density
    history decides (``xflex.policy.DensityCheck``); ``bench.tools.time_probes``
    times the first call's forecast.

    Example:
        >>> rows = run(["llm"], [32768], methods=["threshold", "adaptive"])   # doctest: +SKIP
        >>> print(markdown_table(rows))                                         # doctest: +SKIP
    """
    from torch.nn.attention import SDPBackend

    budget = dict(warmup=max(10, rep_ms // 4), rep=rep_ms)  # do_bench milliseconds
    rows = []
    for family in families:
        causal = FAMILIES[family].causal
        for length in lengths:
            shape = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim)
            q, k, v = make_inputs(family, length, **shape, seed=seed, **({} if sharpness is None else dict(sharpness=sharpness)))
            if backward:
                q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            grad = torch.randn_like(q) if backward else None
            dense = {
                name: dense_sdpa(q, k, v, backend, causal=causal)
                for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION))
            }
            exact = sparse_sdpa(q, k, v, is_causal=causal, enable_gqa=heads != kv_heads, config=Config(threshold=1.0, break_even=False))
            reference = dense["cudnn"]().float()
            error = (exact.float() - reference).abs().max().item()
            # Two bf16 rounding steps of the largest output (|out| reaches 4-8 at 128K).
            if error > 2 * 2**-7 * max(1.0, reference.abs().max().item()):
                raise AssertionError(f"{family} L={length}: xflex at threshold 1.0 differs from cuDNN by {error:.3g}")
            wrap = (lambda fn: _with_backward(fn, grad)) if backward else (lambda fn: fn)
            dense_ms = {name: time_ms(wrap(fn), **budget) for name, fn in dense.items()}
            for method in methods:
                for kernel in kernels:
                    config = Config(
                        method=method, scorer=scorer, scoring_precision=scoring_precision,
                        scoring_reduction=scoring_reduction, threshold=threshold,
                        vertical_mass=vertical_mass, slash_mass=slash_mass, relative_floor=relative_floor, max_alone_ratio=max_alone_ratio, stride=stride, attention_kernel=kernel, break_even=break_even,
                    )  # fmt: skip

                    # Named, as the backend names a model's calls: the call site keeps a density history.
                    def sparse() -> torch.Tensor:
                        return sparse_sdpa(q, k, v, is_causal=causal, enable_gqa=heads != kv_heads, config=config, name=family)

                    with sparsity() as stats:
                        sparse()
                    record = stats.records[-1]
                    chosen = attention_kernel(
                        kernel, q, key_length=length, value_head_dim=head_dim, block_size=config.block_size,
                        captures_tensors=False, needs_grad=backward,
                    )
                    row = SpeedRow(
                        family=family,
                        length=length,
                        method=method,
                        kernel=chosen if record.sparse else "-",
                        cudnn_ms=dense_ms["cudnn"],
                        flash_ms=dense_ms["flash"],
                        xflex_ms=time_ms(wrap(sparse), **budget),
                        plan_ms=time_ms(lambda: plan(q.detach(), k.detach(), is_causal=causal, config=config).blocks, **budget),
                        density=stats.density,
                        dense_reason=record.dense_reason,
                        backward=backward,
                    )
                    rows.append(row)
                    report(row)
            q = k = v = grad = dense = None  # freed before the next length (closures above read them)
            torch.cuda.empty_cache()
    return rows


HEADER = (
    "| family | L | method | kernel | cuDNN ms | flash ms | xflex ms | speed-up vs best dense | density "
    "| scoring+selection (% dense) | block efficiency vs dense |\n|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def _kilo(length: int) -> str:
    """Tokens in K as the command line takes them: 32768 -> "32K", 78643 -> "76.8K"."""
    return f"{length / 1024:.4g}K"


def markdown_row(r: SpeedRow) -> str:
    best = min(r.cudnn_ms, r.flash_ms)
    density = f"{r.density:.3f}" if r.density is not None else f"dense ({r.dense_reason})"
    efficiency = "-" if r.block_efficiency is None else f"{r.block_efficiency:.2f}"
    return (
        f"| {r.family} | {_kilo(r.length)} | {r.method} | {r.kernel} "
        f"| {r.cudnn_ms:.2f} | {r.flash_ms:.2f} | {r.xflex_ms:.2f} | {r.speedup:.2f}x | {density} "
        f"| {r.plan_ms:.2f} ({100 * r.plan_ms / best:.1f}%) | {efficiency} |"
    )


def markdown_table(rows: Sequence[SpeedRow]) -> str:
    """The rows as one markdown table."""
    return "\n".join([HEADER, *(markdown_row(r) for r in rows)])


def plot(rows: Sequence[SpeedRow], path) -> None:
    """Speed-up against length, one line per (family, method, kernel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6.5, 4.2))
    for key in dict.fromkeys((r.family, r.method, r.kernel) for r in rows):
        group = sorted((r for r in rows if (r.family, r.method, r.kernel) == key), key=lambda r: r.length)
        axis.plot([r.length for r in group], [r.speedup for r in group], marker="o", label=" ".join(key))
    axis.axhline(1.0, color="gray", linewidth=0.8)
    axis.set(xscale="log", xlabel="tokens", ylabel="speed-up vs best dense SDPA", title=f"xflex on {torch.cuda.get_device_name()}")
    lengths = sorted({r.length for r in rows})
    axis.set_xticks(lengths, [_kilo(length) for length in lengths])
    axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe_gpu() -> str:
    import triton

    return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"


def parse_length(text: str) -> int:
    """``"32K"``, ``"76.8K"`` or ``"32768"`` in tokens."""
    return int(round(float(text[:-1]) * 1024)) if text.upper().endswith("K") else int(text)
