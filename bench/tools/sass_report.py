"""The scorers' machine code, without a GPU: compiles the Triton scorer
(``triton_kernel.scores_kernel``) or, with ``--kernel gluon``, the Gluon one
(``gluon_kernel.scores_kernel``) for Hopper (sm_90a) on any machine
with Triton installed (its wheel carries ptxas and cuobjdump) and reports
registers, spills, shared memory, the instructions of one reduction step (each
loop that issues HGMMAs) and of one key tile's softmax (the loops around them:
unmasked tiles first, then masked ones). The per-step address arithmetic and
the exact log2 were found this way (bench/NOTES.md, "Scoring kernel
experiments"): iterate here, then time on the GPU. The Gluon kernel's partitions set their own
register budgets (``setmaxnreg``), listed as such.

The kernel is specialised as Triton's launcher would specialise it for one
real call (ints equal to 1 become constants, multiples of 16 are marked so):
the call is captured from ``antidiagonal_block_scores_triton`` on meta
tensors, nothing is allocated.

    python -m bench.tools.sass_report --length 131072 --stride 8 --config 2 --sass out.sass

Triton's compiler here may differ from the GPU machine's: compare variants
with one compiler, and time the one you keep. A flattened config's single
loop holds the softmax too, so its "per step" is per key tile.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile

import torch

from bench.scoring import describe
from xflex.attention.scoring import PAIRINGS

_HEAD_DIM = 128
_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.bool: "*i1"}


@contextlib.contextmanager
def _captured_launch(kernel):
    """Replaces the autotuned kernel's launch with one that records its
    arguments; yields the list they land in."""
    calls, run = [], kernel.run
    kernel.run = lambda *args, grid, warmup, **kwargs: calls.append((args, kwargs))
    interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # lets the wrapper take non-CUDA (meta) tensors
    try:
        yield calls
    finally:
        kernel.run = run
        if interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = interpret


def _source(fn, args, constexprs, source_class):
    """``source_class(fn, ...)`` with the signature Triton's launcher would
    give ``args`` (ints equal to 1 become constants, multiples of 16 are marked)."""
    from triton.runtime.jit import mangle_type

    constexprs = dict(constexprs)
    signature, attrs = {}, {}
    for i, (name, value) in enumerate(zip(fn.arg_names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # allocations are 16-byte aligned
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif not isinstance(value, int):  # a TMA descriptor
            signature[name] = mangle_type(value)
        elif value == 1:
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in constexprs})
    return source_class(fn, signature, {(fn.arg_names.index(n),): v for n, v in constexprs.items()}, attrs)


def compile_for_hopper(
    length: int,
    stride: int,
    causal: bool,
    config_index: int,
    heads: int,
    kv_heads: int,
    block_mask: bool = False,
    kernel: str = "triton",
    scorer: str = "antidiagonal",
):
    """``(CompiledKernel, description)`` for the scorer's first launch on a
    ``(1, heads, length, 128)`` bf16 call (with a ``block_visible`` mask when
    ``block_mask``; Triton only; the tile pairing ``scorer``), compiled for sm_90a."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from xflex.attention.scoring import triton_kernel
    from xflex.attention.scoring.triton_kernel import antidiagonal_block_scores_triton

    q = torch.empty(1, heads, length, _HEAD_DIM, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, kv_heads, length, _HEAD_DIM, dtype=torch.bfloat16, device="meta")
    target = GPUTarget("cuda", 90, 32)
    if kernel == "gluon":
        from triton.experimental.gluon._runtime import GluonASTSource

        from xflex.attention.scoring import gluon_kernel

        rows = -(-length // stride)
        scratch = torch.empty(heads, rows, -(-length // 128), device="meta")
        row_lse = torch.empty(heads, 2, rows, device="meta")
        with _captured_launch(gluon_kernel.scores_kernel) as calls:
            gluon_kernel.launch(
                q, k, scratch, row_lse, stride=stride, tiles_per_block=128 // stride, tile_start=0, chunk=rows,
                diag_shift=0, qk_scale=0.1, causal=causal, interleaved=scorer == "interleaved",
            )  # fmt: skip
        args, constexprs = calls[0]
        options = {key: constexprs.pop(key) for key in ("num_warps", "maxnreg")}
        source = _source(gluon_kernel.scores_kernel, args, constexprs, GluonASTSource)
        return triton.compile(source, target=target, options=options), f"gluon {gluon_kernel.CONFIG}"
    blocks = -(-length // 128)
    visible = torch.empty(1, 1, blocks, blocks, dtype=torch.bool, device="meta") if block_mask else None
    with _captured_launch(triton_kernel.scores_kernel) as calls, _captured_launch(triton_kernel.normalise_kernel):
        antidiagonal_block_scores_triton(
            q, k, stride=stride, block_size=128, causal_offset=0 if causal else None, block_visible=visible, pairing=scorer
        )
    args, constexprs = calls[0]
    config = triton_kernel.CONFIGS[config_index]
    source = _source(triton_kernel.scores_kernel.fn, args, {**constexprs, **config.kwargs}, ASTSource)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return triton.compile(source, target=target, options=options), describe(config)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def _loops(sass: str) -> list[tuple[int, int, list[tuple[int, str]]]]:
    """``(first, last, body)`` of each loop (a branch back to a lower
    address); the body as ``(address, instruction)``."""
    code = [(int(m[1], 16), m[2]) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for end, text in code:
        target = re.search(r"BRA 0x([0-9a-f]+)", text)
        if target and int(target[1], 16) < end:
            start = int(target[1], 16)
            loops.append((start, end, [(a, t) for a, t in code if start <= a <= end]))
    return loops


def _hgmma_groups(body: list[tuple[int, str]]) -> int:
    """HGMMA groups (the HGMMAs one ``gsb0`` commits: one reduction step)."""
    return sum("HGMMA" in t and "gsb0" in t for _, t in body)


def hgmma_loops(sass: str) -> list[tuple[int, int]]:
    """``(instructions, HGMMA groups)`` of each innermost loop that issues
    HGMMAs: the reduction loops."""
    loops = [lp for lp in _loops(sass) if _hgmma_groups(lp[2])]
    innermost = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    return [(len(body), _hgmma_groups(body)) for _, _, body in innermost]


def tile_loops(sass: str) -> list[tuple[int, int]]:
    """``(instructions, MUFU ops)`` outside the inner loops of each loop that
    encloses a reduction loop: one key tile's softmax and loop overhead."""
    loops = _loops(sass)
    result = []
    for start, end, body in loops:
        inner = [(a, b) for a, b, _ in loops if start <= a and b <= end and (a, b) != (start, end)]
        if inner and _hgmma_groups(body):
            own = [t for addr, t in body if not any(a <= addr <= b for a, b in inner)]
            result.append((len(own), sum(t.lstrip("@!P0123456789 ").startswith("MUFU") for t in own)))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--non-causal", action="store_true")
    parser.add_argument("--block-mask", action="store_true", help="with a block_visible mask (the video path)")
    parser.add_argument("--config", type=int, default=2, help="index into triton_kernel.CONFIGS (default 2: 128x256 w8 s3)")
    parser.add_argument("--kernel", choices=["triton", "gluon"], default="triton", help="which scorer (default triton)")
    parser.add_argument("--scorer", choices=PAIRINGS, default="antidiagonal", help="the tile pairing")
    parser.add_argument("--sass", metavar="FILE", help="also write the disassembly here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("sass_report.py compiles kernels: run it without TRITON_INTERPRET=1")
    if args.kernel == "gluon" and args.block_mask:
        sys.exit("the Gluon scorer has no block mask (--block-mask is for --kernel triton)")
    kernel, described = compile_for_hopper(
        args.length, args.stride, not args.non_causal, args.config, args.heads, args.kv_heads or args.heads,
        args.block_mask, args.kernel, args.scorer,
    )
    sass = _cuobjdump(kernel.asm["cubin"], "-sass")
    if args.sass:
        with open(args.sass, "w") as f:
            f.write(sass)
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", _cuobjdump(kernel.asm["cubin"], "-res-usage"))
    mask = ", block mask" if args.block_mask else ""
    print(f"{described}; S={args.stride}, L={args.length}, {'non-causal' if args.non_causal else 'causal'}{mask}, {args.scorer}")
    print(f"registers {usage[1]}, stack {usage[2]} B, local (spills) {usage[3]} B, shared {kernel.metadata.shared} B")
    for kind in ("TRY_ALLOC", "DEALLOC"):  # the partitions' register budgets (setmaxnreg)
        values = sorted({int(n, 16) for n in re.findall(rf"USETMAXREG\.{kind}\S*(?: \S+,)? 0x([0-9a-f]+)", sass)})
        if values:
            print(f"setmaxnreg {kind.lower()}: {', '.join(map(str, values))}")
    for size, groups in hgmma_loops(sass):
        print(f"HGMMA loop: {size} instructions, {groups} reduction steps, {size / groups:.0f} per step")
    for size, mufu in tile_loops(sass):
        print(f"key-tile loop: {size} instructions outside the reduction loop, {mufu} of them MUFU")


if __name__ == "__main__":
    sys.exit(main())
