"""Selection quality: recall (the true attention mass inside the selected
blocks) against density, per method and threshold, beside the oracle (the
fewest blocks that reach the same recall, row by row), on the synthetic input
families of ``xflex/benchmark/inputs.py`` and on SmolLM2-135M's real attention, layer by
layer.

Recall and oracle are exact on evaluation query blocks spread over the
sequence (true softmax rows over all keys), chosen apart from the adaptive
method's probe blocks so that it is not scored on the rows it calibrated on.

    python -m bench.selection_quality --families llm spiky needle video diffuse --length 16384
    python -m bench.selection_quality --smollm2 --tokens 4096 --texts gpl3 argparse pydoc
    python -m bench.selection_quality --device cuda --length 32768 --plot-dir bench/plots
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import math
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

import xflex
from bench import texts
from bench.common import DEFAULT_MAX_ALONE_RATIO, DEFAULT_PRECISION, DEFAULT_REDUCTION, DEFAULT_RELATIVE_FLOOR, DEFAULT_SCORER, DEFAULT_SLASH_MASS, DEFAULT_VERTICAL_MASS, setting_name
from xflex.benchmark.inputs import FAMILIES, make_inputs
from xflex import demo
from xflex.attention import call_pattern, oracle_block_counts, sampled_block_mass
from xflex.attention.scoring import PAIRINGS, PRECISIONS
from xflex.config import SCORING_REDUCTIONS
from xflex.attention.scoring.fp8 import dequantize, fp8_per_head

METHODS = {"threshold": (0.8, 0.9, 0.95, 0.98, 0.99), "adaptive": (0.8, 0.9, 0.95, 0.98)}


@dataclasses.dataclass
class Point:
    """One (input, method, threshold) measurement over the evaluation rows."""

    source: str  # family name, or "layer N" of a text
    method: str
    threshold: float
    recall: float  # mean over heads and rows
    worst_recall: float  # the worst (head, row)
    density: float  # selected / visible blocks, mean over heads and rows
    oracle: float  # the oracle's density at each row's recall, mean


def evaluation_blocks(n_q: int, count: int, probe_blocks: int, causal: bool) -> list[int]:
    """Query blocks spread over the call, none of them an adaptive probe block."""
    from xflex.attention.selection.probes import probe_query_blocks

    probes = set(probe_query_blocks(n_q, probe_blocks, causal=causal))
    candidates = [b for b in range(1, n_q) if b not in probes]
    picks = torch.linspace(0, len(candidates) - 1, min(count, len(candidates))).round().long().tolist()
    return sorted({candidates[i] for i in picks})


def measure(
    source: str,
    q: torch.Tensor,
    k: torch.Tensor,
    causal: bool,
    *,
    stride: int,
    samples: int,
    methods: dict[str, tuple[float, ...]] = METHODS,
    scorers: tuple[str, ...] = (DEFAULT_SCORER,),
    precisions: tuple[str, ...] = (DEFAULT_PRECISION,),
    vertical_masses: tuple[float, ...] = (DEFAULT_VERTICAL_MASS,),
    reductions: tuple[str, ...] = (DEFAULT_REDUCTION,),
    slash_masses: tuple[float, ...] = (DEFAULT_SLASH_MASS,),
    relative_floors: tuple[float, ...] = (DEFAULT_RELATIVE_FLOOR,),
    max_alone_ratios: tuple[float, ...] = (DEFAULT_MAX_ALONE_RATIO,),
) -> list[Point]:
    """Every method and threshold of ``methods``, with each scorer, scoring
    precision, vertical-line mass, scoring reduction, slash-line mass,
    relative floor and max-alone ratio, on one call (named
    by ``bench.common.setting_name``)."""
    config = xflex.Config(block_size=128, min_seq_len=0, stride=stride)
    n_q = math.ceil(q.shape[2] / config.block_size)
    rows = evaluation_blocks(n_q, samples, config.probe_blocks, causal)
    mass = sampled_block_mass(q, k, None, causal, None, config.block_size, rows)  # (B, H, R, nK)
    visible = call_pattern(q, k, None, causal, config.block_size).visibility.any[:, :, rows].float()
    n_visible = visible.sum(-1)
    points = []
    grid = itertools.product(scorers, precisions, vertical_masses, reductions, slash_masses, relative_floors, max_alone_ratios)
    for scorer, precision, vertical_mass, reduction, slash_mass, relative_floor, max_alone_ratio in grid:
        if max_alone_ratio != DEFAULT_MAX_ALONE_RATIO and "+" not in reduction:
            continue  # the ratio chooses between two estimates: one-estimate reductions ignore it
        # fp8: what the Gluon scorer multiplies, on every device (elsewhere the
        # option is ignored): q and k rounded here, the true mass kept unrounded.
        q_est, k_est = (q, k) if precision == "input" else (dequantize(*fp8_per_head(x), x.dtype) for x in (q, k))
        for method, thresholds in methods.items():
            name = setting_name(method, scorer, precision, vertical_mass, reduction, slash_mass, relative_floor, max_alone_ratio)
            for threshold in thresholds:
                run = dataclasses.replace(
                    config, method=method, threshold=threshold, scorer=scorer, scoring_precision=precision,
                    vertical_mass=vertical_mass, scoring_reduction=reduction, slash_mass=slash_mass,
                    relative_floor=relative_floor, max_alone_ratio=max_alone_ratio,
                )  # fmt: skip
                selected = xflex.plan(q_est, k_est, is_causal=causal, config=run).selected[:, :, rows]
                recall = (mass * selected).sum(-1)
                kept = selected.sum(-1)
                density = kept / n_visible
                # The selection itself reaches its recall, so the fewest blocks are at most
                # as many; without the cap, rows at recall ~1 (rounding) count invisible blocks.
                oracle = torch.minimum(oracle_block_counts(mass, recall), kept) / n_visible
                points.append(
                    Point(source, name, threshold, recall.mean().item(), recall.min().item(), density.mean().item(), oracle.mean().item())
                )
    return points


@contextlib.contextmanager
def captured_attention_inputs() -> Iterator[list[tuple]]:
    """Record ``(q, k, v, attn_mask, is_causal, scale)`` of every SDPA call made inside the block (eager)."""
    calls = []
    original = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append((q.detach(), k.detach(), v.detach(), attn_mask, is_causal, scale))
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = recording
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = original


def smollm2_points(text_names: list[str], tokens: int, stride: int, samples: int, device: torch.device, **grid) -> dict[str, list[Point]]:
    """Per text, the points of every layer of SmolLM2-135M on its first ``tokens`` tokens."""
    model, tokenizer = demo.load_smollm2(device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    out = {}
    for name in text_names:
        ids = tokenizer(texts.read(name), return_tensors="pt").input_ids[:, :tokens].to(device)
        with torch.no_grad(), captured_attention_inputs() as calls:
            model(ids)
        demo.log(f"{name}: {ids.shape[1]} tokens, {len(calls)} attention calls")
        points = []
        for layer, (q, k, _, mask, causal, scale) in enumerate(calls):
            if mask is not None or not causal:
                raise RuntimeError("SmolLM2 was expected to call SDPA with is_causal=True and no mask")
            with torch.no_grad():
                points += measure(f"layer {layer}", q, k, True, stride=stride, samples=samples, **grid)
        out[name] = points
    return out


def summary(points: list[Point]) -> list[tuple[str, float, float, float, float, float, str]]:
    """Per (method, threshold): mean recall, the worst source's mean recall, the
    worst (head, row) recall, density, oracle density, worst source name."""
    rows = []
    keys = dict.fromkeys((p.method, p.threshold) for p in points)
    for method, threshold in keys:
        group = [p for p in points if (p.method, p.threshold) == (method, threshold)]
        worst = min(group, key=lambda p: p.recall)
        rows.append(
            (
                f"{method} {threshold:g}",
                statistics.mean(p.recall for p in group),
                worst.recall,
                min(p.worst_recall for p in group),
                statistics.mean(p.density for p in group),
                statistics.mean(p.oracle for p in group),
                worst.source,
            )
        )
    return rows


def table(title: str, points: list[Point]) -> str:
    lines = [
        f"#### {title}",
        "",
        "| method, threshold | recall (mean) | recall (worst layer / family) | recall (worst head row) | density | oracle density at that recall | density / oracle |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, recall, worst, worst_row, density, oracle, worst_source in summary(points):
        lines.append(
            f"| {name} | {recall:.3f} | {worst:.3f} ({worst_source}) | {worst_row:.3f} | {density:.3f} | {oracle:.3f} | {density / max(oracle, 1e-9):.2f} |"
        )
    return "\n".join(lines)


def plot(title: str, points: list[Point], path: Path) -> None:
    """Recall against density per method, and the oracle's curve."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        demo.log("matplotlib not installed: plot skipped (pip install 'xflex[bench]')")
        return
    fig, axis = plt.subplots(figsize=(5.5, 4.2))
    for method, marker in (("threshold", "o"), ("adaptive", "s")):
        group = [row for row in summary(points) if row[0].startswith(method)]
        axis.plot([r[4] for r in group], [r[1] for r in group], marker=marker, label=method)
        axis.plot([r[5] for r in group], [r[1] for r in group], marker=marker, linestyle=":", color="gray", alpha=0.7)
    axis.plot([], [], linestyle=":", color="gray", label="oracle at the same recall")
    axis.set(xlabel="density (computed / visible blocks)", ylabel="recall (true mass kept)", title=title, xlim=(0, 1.02), ylim=(0.6, 1.01))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    demo.log(f"plot written to {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", default=["llm", "spiky", "needle", "video", "diffuse"], choices=list(FAMILIES))
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="key / value heads (default: --heads; fewer: GQA, as xflex bench's 32 / 8)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sharpness", type=float, default=None, help="scales the families' planted bonuses (default: each family's own)")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M's layers on real texts")
    parser.add_argument("--texts", nargs="+", default=["gpl3", "argparse", "pydoc"], choices=list(texts.TEXTS))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--scorers", nargs="+", default=[DEFAULT_SCORER], choices=list(PAIRINGS), help="the estimate's tile pairing(s)")
    parser.add_argument("--precisions", nargs="+", default=[DEFAULT_PRECISION], choices=list(PRECISIONS), help="scoring precision(s)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--thresholds", type=float, nargs="+", default=None, help="replace each method's threshold grid (METHODS)")
    parser.add_argument("--reductions", nargs="+", default=[DEFAULT_REDUCTION], choices=list(SCORING_REDUCTIONS), help="scoring reduction(s)")
    parser.add_argument("--vertical-masses", type=float, nargs="+", default=[DEFAULT_VERTICAL_MASS], help="vertical_mass value(s) (0: off)")
    parser.add_argument("--slash-masses", type=float, nargs="+", default=[DEFAULT_SLASH_MASS], help="slash_mass value(s) (0: off)")
    parser.add_argument("--relative-floors", type=float, nargs="+", default=[DEFAULT_RELATIVE_FLOOR], help="relative_floor value(s) (0: off)")
    parser.add_argument("--max-alone-ratios", type=float, nargs="+", default=[DEFAULT_MAX_ALONE_RATIO], help="max_alone_ratio value(s) under mean+max (0: the union everywhere)")
    parser.add_argument("--samples", type=int, default=16, help="evaluation query blocks per call")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--plot-dir", type=Path, default=None, help="one PNG per family / text here (needs matplotlib)")
    args = parser.parse_args(argv)
    grid = dict(
        methods={m: tuple(args.thresholds or METHODS[m]) for m in args.methods},
        scorers=tuple(args.scorers),
        precisions=tuple(args.precisions),
        vertical_masses=tuple(args.vertical_masses),
        slash_masses=tuple(args.slash_masses),
        relative_floors=tuple(args.relative_floors),
        max_alone_ratios=tuple(args.max_alone_ratios),
        reductions=tuple(args.reductions),
    )
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    sections = []
    for family in args.families:
        points = []
        for seed in args.seeds:
            shape = dict(heads=args.heads, kv_heads=args.kv_heads or args.heads, head_dim=128, device=device, dtype=dtype, seed=seed)
            q, k, _ = make_inputs(family, args.length, **shape, **({} if args.sharpness is None else dict(sharpness=args.sharpness)))
            with torch.no_grad():
                points += measure(family, q, k, FAMILIES[family].causal, stride=args.stride, samples=args.samples, **grid)
            del q, k
        sharp = "" if args.sharpness is None else f", sharpness {args.sharpness:g}"
        gqa = f" (KV {args.kv_heads})" if args.kv_heads and args.kv_heads != args.heads else ""
        title = f"{family}{sharp}, {args.length} tokens, H={args.heads}{gqa}, D=128, S={args.stride}, seeds {args.seeds}"
        sections.append(table(title, points))
        print(sections[-1], flush=True)
        if args.plot_dir:
            plot(title, points, args.plot_dir / f"selection_{family}.png")
    if args.smollm2:
        for name, points in smollm2_points(args.texts, args.tokens, args.stride, args.samples, device, **grid).items():
            title = f"SmolLM2-135M, {name}, {args.tokens} tokens, 30 layers, S={args.stride}"
            sections.append(table(title, points))
            print(sections[-1], flush=True)
            if args.plot_dir:
                plot(title, points, args.plot_dir / f"selection_smollm2_{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
