"""Accuracy of xflex on SmolLM2-135M-Instruct: perplexity of a long real text
and retrieval of a fact hidden in it, dense against each sparse setting, over
several texts (genres), fact depths, lengths and passphrase seeds.

Per prompt the eager model runs dense once; the model compiled ONCE with
``backend="xattn"`` then runs every setting, switched at run time with
``xflex.sparsity`` (no recompilation). Selection quality per layer (recall
against the oracle) is ``bench/selection_quality.py``'s job.

    python -m bench.accuracy --quick                 # one text, one length, one depth
    python -m bench.accuracy --texts gpl3 argparse pydoc --lengths 4096 7000 --depths 0.1 0.5 0.9
    python -m bench.accuracy --settings dense threshold:0.9 adaptive:0.95 --out table.md
    python -m bench.accuracy --settings threshold:0.98 threshold+antidiagonal:0.98   # METHOD+SCORER
    python -m bench.accuracy --device cuda --backend gluon --settings threshold:0.99 threshold+fp8:0.99
    python -m bench.accuracy --settings threshold+vertical=0:0.99 threshold:0.99       # vertical lines off / on
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import texts
from bench.common import (
    DEFAULT_MAX_ALONE_RATIO,
    DEFAULT_PRECISION,
    DEFAULT_REDUCTION,
    DEFAULT_RELATIVE_FLOOR,
    DEFAULT_SCORER,
    DEFAULT_SLASH_MASS,
    DEFAULT_VERTICAL_MASS,
    setting_name,
)
from xflex import demo
from xflex.attention.backends import BACKENDS

QUICK = dict(texts=["gpl3"], lengths=[4096], depths=[0.5])
DEFAULT_SETTINGS = ["threshold:0.9", "threshold:0.95", "adaptive:0.9", "adaptive:0.95"]


@dataclasses.dataclass(frozen=True)
class Setting:
    """``method[+scorer][+precision][+vertical=X][+reduction][+slash=X][+floor=X]:threshold`` (stride from ``--stride``)."""

    method: str
    threshold: float
    scorer: str = DEFAULT_SCORER
    precision: str = DEFAULT_PRECISION
    vertical_mass: float = DEFAULT_VERTICAL_MASS
    reduction: str = DEFAULT_REDUCTION
    slash_mass: float = DEFAULT_SLASH_MASS
    relative_floor: float = DEFAULT_RELATIVE_FLOOR
    max_alone_ratio: float = DEFAULT_MAX_ALONE_RATIO

    @staticmethod
    def parse(text: str) -> Setting:
        from xflex.attention.scoring import PAIRINGS, PRECISIONS
        from xflex.config import METHODS, SCORING_REDUCTIONS as REDUCTIONS

        error = argparse.ArgumentTypeError(
            f"expected METHOD[+SCORER][+PRECISION][+vertical=X][+REDUCTION][+slash=X][+floor=X][+alone=X]:THRESHOLD with METHOD in {METHODS}, "
            f"SCORER in {PAIRINGS}, PRECISION in {PRECISIONS} and REDUCTION in {REDUCTIONS}, but got {text!r}"
        )
        name, _, threshold = text.partition(":")
        method, *options = name.replace("+mean+max", "+mean|max").split("+")  # one reduction
        fields = {}
        for option in options:
            if option in PAIRINGS:
                field, value = "scorer", option
            elif option in PRECISIONS:
                field, value = "precision", option
            elif option.replace("|", "+") in REDUCTIONS:
                field, value = "reduction", option.replace("|", "+")
            elif option.startswith("vertical="):
                field, value = "vertical_mass", option.removeprefix("vertical=")
            elif option.startswith("slash="):
                field, value = "slash_mass", option.removeprefix("slash=")
            elif option.startswith("floor="):
                field, value = "relative_floor", option.removeprefix("floor=")
            elif option.startswith("alone="):
                field, value = "max_alone_ratio", option.removeprefix("alone=")
            else:
                raise error
            if field in fields:
                raise error
            fields[field] = value
        try:
            fields["threshold"] = float(threshold)
            for field in ("vertical_mass", "slash_mass", "relative_floor", "max_alone_ratio"):
                if field in fields:
                    fields[field] = float(fields[field])
        except ValueError:
            raise error from None
        if method not in METHODS:
            raise error
        return Setting(method, **fields)

    @property
    def name(self) -> str:
        return f"{setting_name(self.method, self.scorer, self.precision, self.vertical_mass, self.reduction, self.slash_mass, self.relative_floor, self.max_alone_ratio)} {self.threshold:g}"


@dataclasses.dataclass
class Row:
    """One run of one prompt."""

    text: str
    length: int
    depth: float
    seed: int
    setting: str  # "dense" or Setting.name
    density: float | None
    perplexity: float
    ppl_ratio: float
    retrieved: bool
    answer: str
    prefill_s: float  # excluding compilation


def run_prompt(model, compiled, tokenizer, prompt, text, seed, settings, args) -> list[Row]:
    """Dense, then every sparse setting, on one prompt."""
    L = prompt.input_ids.shape[1]
    where = dict(text=text, length=L, depth=prompt.depth, seed=seed)
    demo.log(f"{text}, {L} tokens, depth {prompt.depth}, seed {seed}: dense (eager)")
    dense = demo.run_prompt(model, tokenizer, prompt, new_tokens=args.new_tokens)
    rows = [Row(**where, setting="dense", density=None, perplexity=dense.perplexity, ppl_ratio=1.0,
                retrieved=dense.retrieved, answer=dense.answer, prefill_s=dense.prefill_s - dense.prefill_compile_s)]
    for setting in settings:
        result = demo.run_sparse(
            compiled, tokenizer, prompt, new_tokens=args.new_tokens, dynamic_length=True,
            method=setting.method, threshold=setting.threshold, scorer=setting.scorer,
            scoring_precision=setting.precision, scoring_reduction=setting.reduction, vertical_mass=setting.vertical_mass, slash_mass=setting.slash_mass,
            relative_floor=setting.relative_floor, max_alone_ratio=setting.max_alone_ratio, stride=args.stride, backend=args.backend,
            break_even=False,  # the selection's own accuracy, also where a GPU would run these lengths dense
        )  # fmt: skip
        density = result.stats.density
        demo.log(f"  {setting.name}: density {_fmt(density)}, ppl ratio {result.perplexity / dense.perplexity:.4f}, retrieved {result.retrieved}")
        rows.append(Row(**where, setting=setting.name, density=density, perplexity=result.perplexity,
                        ppl_ratio=result.perplexity / dense.perplexity, retrieved=result.retrieved,
                        answer=result.answer, prefill_s=result.prefill_s - result.prefill_compile_s))  # fmt: skip
    return rows


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def prompts_table(rows: list[Row]) -> str:
    lines = [
        "| text | length | depth | seed | setting | density | perplexity | ppl / dense | retrieved | answer |",
        "|---|---:|---:|---:|---|---:|---:|---:|:-:|---|",
    ]
    for r in rows:
        answer = r.answer.strip().replace("|", "\\|").replace("\n", " ")[:60]
        lines.append(
            f"| {r.text} | {r.length} | {r.depth:g} | {r.seed} | {r.setting} | {_fmt(r.density)} | {r.perplexity:.3f} "
            f"| {r.ppl_ratio:.4f} | {'yes' if r.retrieved else 'no'} | `{answer}` |"
        )
    return "\n".join(lines)


def summary_table(rows: list[Row]) -> str:
    """Per setting over all prompts: density, perplexity ratio (mean, worst),
    prompts within 2% of dense, retrieval, and retrieval equal to dense."""
    dense = {(r.text, r.length, r.depth, r.seed): r for r in rows if r.setting == "dense"}
    lines = [
        "| setting | density (mean) | ppl / dense (mean) | ppl / dense (worst) | prompts within 2% | retrieved | same retrieval as dense |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for setting in dict.fromkeys(r.setting for r in rows):
        group = [r for r in rows if r.setting == setting]
        densities = [r.density for r in group if r.density is not None]
        same = sum(r.retrieved == dense[(r.text, r.length, r.depth, r.seed)].retrieved for r in group)
        lines.append(
            f"| {setting} | {_fmt(statistics.mean(densities)) if densities else '1 (dense)'} "
            f"| {statistics.mean(r.ppl_ratio for r in group):.4f} | {max(r.ppl_ratio for r in group):.4f} "
            f"| {sum(r.ppl_ratio <= 1.02 for r in group)}/{len(group)} | {sum(r.retrieved for r in group)}/{len(group)} "
            f"| {same}/{len(group)} |"
        )
    return "\n".join(lines)


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK}")
    parser.add_argument("--texts", nargs="+", default=["gpl3", "argparse", "pydoc"], choices=list(texts.TEXTS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 7000], help="prompt lengths in tokens")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="fact depths (fractions)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="passphrase seeds")
    parser.add_argument("--settings", type=Setting.parse, nargs="+", default=[Setting.parse(s) for s in DEFAULT_SETTINGS])
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="kernels for scoring and selection (gluon: the Hopper scorer at every length, e.g. for fp8)")
    parser.add_argument("--new-tokens", type=int, default=12, help="greedy tokens per answer")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    return args


def main(argv=None) -> int:
    args = _parse_args(argv)
    start = time.perf_counter()
    device = demo.resolve_device(args.device)
    dtype = demo.resolve_dtype(args.dtype, device)
    demo.log(f"loading SmolLM2-135M-Instruct ({device}, {dtype})")
    model, tokenizer = demo.load_smollm2(device, dtype)
    # Compiled once; settings change at run time and the prompt length is marked dynamic.
    compiled = demo.compile_sparse(model, block_size=args.block_size)
    rows = []
    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        for text in args.texts:
            path = texts.write_to(text, Path(folder))
            for length in args.lengths:
                for depth in args.depths:
                    for seed in args.seeds:
                        prompt = demo.build_prompt(tokenizer, tokens=length, depth=depth, seed=seed, text_path=path)
                        rows += run_prompt(model, compiled, tokenizer, prompt, text, seed, args.settings, args)
    report = "\n\n".join(
        [
            f"## xflex accuracy: SmolLM2-135M-Instruct, {device}, {str(dtype).removeprefix('torch.')}, block {args.block_size}, S={args.stride}, backend {args.backend}",
            prompts_table(rows),
            "### By setting (over all prompts)",
            summary_table(rows),
            f"total {time.perf_counter() - start:.0f} s, of which compiling {demo.compile_seconds():.0f} s",
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
