"""Accuracy of XAttention (xflex) on SmolLM2-135M-Instruct: perplexity and
hidden-fact retrieval against density, beside dense SDPA.

For every prompt length and fact depth the eager model runs dense once; the
model compiled ONCE with ``backend="xattn"`` then runs at every
(threshold, stride), switched at run time with ``xflex.sparsity`` (no
recompilation). Optional selection quality per layer: recall (true attention
mass inside the blocks the op selects) and oracle density (fewest blocks
holding tau of it), exact on sampled query blocks of the dense run.

    python -m bench.accuracy --quick            # one length, one depth (~10 min on a 2-core CPU)
    python -m bench.accuracy --plot accuracy.png
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import xflex
from bench import selection_quality
from xflex import demo
from xflex.demo import compile_seconds
from xflex.attention import oracle_block_counts, sampled_block_mass

QUICK_LENGTHS = (4096,)
QUICK_DEPTHS = (0.5,)


@dataclasses.dataclass
class Row:
    """One run: dense (threshold None) or sparse at (threshold, stride)."""

    length: int
    depth: float
    threshold: float | None
    stride: int | None
    density: float | None
    perplexity: float
    ppl_ratio: float
    retrieved: bool
    answer: str
    prefill_s: float  # excluding compilation

    @property
    def method(self) -> str:
        return "dense" if self.threshold is None else _config_name(self.threshold, self.stride)


def _config_name(threshold: float, stride: int) -> str:
    return f"tau {threshold:g} S {stride}"


# ---------------------------------------------------- selection quality ---


def _layer_quality(call, configs, block_size: int, samples: int) -> dict[tuple[float, int], tuple[float, float, float]]:
    """``{(tau, S): (recall, density, oracle density)}`` for one prefill call,
    over ``samples`` query blocks spread over the sequence (the last included)."""
    q, k, _mask, _is_causal, scale = call
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    n_q = math.ceil(q.shape[2] / block_size)
    q_blocks = sorted(set(torch.linspace(1, n_q - 1, samples).round().long().tolist()))
    mass = sampled_block_mass(q, k, None, True, scale, block_size, q_blocks)[0]  # (H, samples, nK)
    visible = torch.tensor([i + 1 for i in q_blocks], dtype=torch.float32)
    out = {}
    for threshold, stride in configs:
        config = xflex.Config(threshold=threshold, stride=stride, block_size=block_size, min_seq_len=0)
        selected = xflex.plan(q, k, is_causal=True, scale=scale, config=config).selected
        chosen = selected[0][:, q_blocks]
        recall = (mass * chosen).sum(-1).mean().item()
        density = (chosen.sum(-1).float() / visible).mean().item()
        oracle = (oracle_block_counts(mass, threshold).float() / visible).mean().item()
        out[(threshold, stride)] = (recall, density, oracle)
    return out


# ------------------------------------------------------------------ runs ---


def _run_length_depth(model, compiled, tokenizer, length, depth, args):
    """Dense and every sparse setting on one prompt: rows, per-layer quality,
    and the per-layer density each sparse run reported."""
    prompt = demo.build_prompt(tokenizer, tokens=length, depth=depth, seed=args.seed)
    L = prompt.input_ids.shape[1]
    demo.log(f"length {L}, depth {depth}: dense (eager)")
    quality = []
    if args.samples > 0:
        with selection_quality.captured_attention_inputs() as calls:
            dense = demo.run_prompt(model, tokenizer, prompt, new_tokens=args.new_tokens)
        prefill_calls = [c for c in calls if c[0].shape[2] == L and c[1].shape[2] == L and c[2] is None and c[3]]
        configs = [(t, s) for t in args.thresholds for s in args.strides]
        demo.log(f"selection quality on {len(prefill_calls)} layers x {len(configs)} settings")
        quality = [_layer_quality(c, configs, args.block_size, args.samples) for c in prefill_calls]
        del calls, prefill_calls
    else:
        dense = demo.run_prompt(model, tokenizer, prompt, new_tokens=args.new_tokens)
    dense_s = dense.prefill_s - dense.prefill_compile_s
    rows = [Row(L, depth, None, None, None, dense.perplexity, 1.0, dense.retrieved, dense.answer, dense_s)]
    layer_density = {}
    for threshold in args.thresholds:
        for stride in args.strides:
            name = _config_name(threshold, stride)
            result = demo.run_sparse(
                compiled, tokenizer, prompt, new_tokens=args.new_tokens,
                dynamic_length=len(args.lengths) > 1, threshold=threshold, stride=stride,
            )
            extra = f", compiling {result.compile_s:.0f} s" if result.compile_s > 1 else ""
            demo.log(f"length {L}, depth {depth}: {name}: density {_fmt(result.stats.density)}, {result.seconds:.1f} s{extra}")
            layer_density[(threshold, stride)] = list(result.stats.density_by_call().values())
            rows.append(
                Row(L, depth, threshold, stride, result.stats.density, result.perplexity,
                    result.perplexity / dense.perplexity, result.retrieved, result.answer,
                    result.prefill_s - result.prefill_compile_s)
            )
    return rows, quality, layer_density


# -------------------------------------------------------------- reports ---


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def runs_table(rows: list[Row]) -> str:
    lines = [
        "| length | depth | method | density | perplexity | ppl / dense | retrieved | answer | prefill s (excl. compile) |",
        "|---:|---:|---|---:|---:|---:|:-:|---|---:|",
    ]
    for r in rows:
        answer = r.answer.strip().replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {r.length} | {r.depth:g} | {r.method} | {_fmt(r.density)} | {r.perplexity:.3f} | {r.ppl_ratio:.4f} "
            f"| {'yes' if r.retrieved else 'no'} | `{answer}` | {r.prefill_s:.1f} |"
        )
    return "\n".join(lines)


def summary_table(rows: list[Row], quality: list[dict]) -> str:
    """Per method over all prompts: mean density, retrieval rate, perplexity
    ratio, and (when measured) mean/worst layer recall and oracle density."""
    methods = list(dict.fromkeys(r.method for r in rows))
    header = "| method | density | retrieval | ppl / dense (mean) | ppl / dense (max) |"
    rule = "|---|---:|---:|---:|---:|"
    if quality:
        header += " recall (mean) | recall (worst layer) | oracle density |"
        rule += "---:|---:|---:|"
    lines = [header, rule]
    for method in methods:
        group = [r for r in rows if r.method == method]
        densities = [r.density for r in group if r.density is not None]
        line = (
            f"| {method} | {_fmt(statistics.mean(densities)) if densities else '1 (dense)'} "
            f"| {sum(r.retrieved for r in group)}/{len(group)} "
            f"| {statistics.mean(r.ppl_ratio for r in group):.4f} | {max(r.ppl_ratio for r in group):.4f} |"
        )
        if quality:
            key = (group[0].threshold, group[0].stride)
            if group[0].threshold is None:
                line += " - | - | - |"
            else:
                per_layer = _per_layer_means(quality, key)
                recalls = [rec for rec, _, _ in per_layer]
                worst = min(range(len(recalls)), key=recalls.__getitem__)
                line += (
                    f" {statistics.mean(recalls):.3f} | {recalls[worst]:.3f} (layer {worst}) "
                    f"| {statistics.mean(o for _, _, o in per_layer):.3f} |"
                )
        lines.append(line)
    return "\n".join(lines)


def _per_layer_means(quality: list[list[dict]], key) -> list[tuple[float, float, float]]:
    """Mean (recall, density, oracle) per layer over all prompts."""
    layers = len(quality[0])
    return [
        tuple(statistics.mean(prompt[layer][key][i] for prompt in quality) for i in range(3))
        for layer in range(layers)
    ]


def layer_table(quality: list[list[dict]], configs, layer_density: dict[tuple, list[float]]) -> str:
    """Per layer and setting: recall, then selected density / oracle density on
    the sampled query blocks, then the whole-run density the op reported."""
    names = [_config_name(*c) for c in configs]
    lines = [
        "| layer | " + " | ".join(names) + " |",
        "|---:|" + "---|" * len(names),
    ]
    per_config = {c: _per_layer_means(quality, c) for c in configs}
    for layer in range(len(quality[0])):
        cells = []
        for c in configs:
            recall, density, oracle = per_config[c][layer]
            run = layer_density.get(c, [])
            whole = f"; run {run[layer]:.2f}" if layer < len(run) else ""
            cells.append(f"{recall:.2f} ({density:.2f}/{oracle:.2f}{whole})")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    """Retrieval rate and perplexity ratio against density, one point per
    setting (mean over prompts); skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        demo.log("matplotlib not installed: plot skipped (pip install matplotlib)")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    thresholds = sorted({r.threshold for r in rows if r.threshold is not None})
    shades = [0.15 + 0.7 * i / max(len(thresholds) - 1, 1) for i in range(len(thresholds))]
    colours = dict(zip(thresholds, plt.get_cmap("viridis")(shades)))
    for method in dict.fromkeys(r.method for r in rows):
        group = [r for r in rows if r.method == method]
        first = group[0]
        density = 1.0 if first.density is None else statistics.mean(r.density for r in group)
        retrieval = sum(r.retrieved for r in group) / len(group)
        ratio = statistics.mean(r.ppl_ratio for r in group)
        style = (
            dict(marker="*", color="black", s=120)
            if first.threshold is None
            else dict(marker="o" if first.stride == 8 else "s", color=colours[first.threshold], s=60, alpha=0.8)
        )
        left.scatter(density, retrieval, label=method, **style)
        right.scatter(density, ratio, **style)
    left.set(xlabel="density (computed / visible blocks)", ylabel="retrieval rate", title="hidden-fact retrieval", ylim=(-0.05, 1.05))
    right.set(xlabel="density (computed / visible blocks)", ylabel="perplexity / dense", title="text perplexity")
    for axis in (left, right):
        axis.set_xlim(0, 1.05)
        axis.grid(alpha=0.3)
    left.legend(fontsize=8, loc="center right")
    lengths = sorted({r.length for r in rows})
    fig.suptitle(f"xflex on SmolLM2-135M-Instruct, prompts of {', '.join(map(str, lengths))} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    demo.log(f"plot written to {path}")


# ------------------------------------------------------------------ main ---


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS}, depths {QUICK_DEPTHS}")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 7000], help="prompt lengths in tokens")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="fact depths (fractions)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--strides", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=12, help="greedy tokens per answer")
    parser.add_argument("--samples", type=int, default=8, help="query blocks per layer for recall (0: skip quality)")
    parser.add_argument("--seed", type=int, default=0, help="picks the passphrase")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--plot", type=Path, default=Path("accuracy.png"), help="PNG path (needs matplotlib)")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.depths = list(QUICK_LENGTHS), list(QUICK_DEPTHS)
    return args


def main(argv=None) -> int:
    args = _parse_args(argv)
    start = time.perf_counter()
    device = demo.resolve_device(args.device)
    dtype = demo.resolve_dtype(args.dtype, device)
    demo.log(f"loading SmolLM2-135M-Instruct ({device}, {dtype})")
    model, tokenizer = demo.load_smollm2(device, dtype)
    # Compiled once; thresholds and strides change at run time, and several
    # lengths share one prefill graph (the prompt length is marked dynamic).
    compiled = demo.compile_sparse(model, block_size=args.block_size)
    if args.samples <= 0:
        demo.log("selection quality skipped (--samples 0)")
    configs = [(t, s) for t in args.thresholds for s in args.strides]
    rows, quality, densities = [], [], {c: [] for c in configs}
    with torch.no_grad():
        for length in args.lengths:
            for depth in args.depths:
                new_rows, new_quality, layer_density = _run_length_depth(model, compiled, tokenizer, length, depth, args)
                rows += new_rows
                if new_quality:
                    quality.append(new_quality)
                for config, values in layer_density.items():
                    densities[config].append(values)
    run_density = {c: [statistics.mean(v) for v in zip(*runs)] for c, runs in densities.items() if runs}
    compile_s = compile_seconds()
    sections = [
        f"## xflex accuracy: SmolLM2-135M-Instruct, {device}, {str(dtype).removeprefix('torch.')}, block {args.block_size}",
        runs_table(rows),
        "### By setting (over all prompts)",
        summary_table(rows, quality),
    ]
    if quality:
        sections += [
            f"### Selection quality per layer: recall (selected density / oracle density on {args.samples} "
            "sampled query blocks of the dense run; run: the sparse run's whole-layer density), mean over prompts",
            layer_table(quality, configs, run_density),
        ]
    sections.append(f"total {time.perf_counter() - start:.0f} s, of which compiling {compile_s:.0f} s")
    report = "\n\n".join(sections)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
