"""bench/tools/sass_report.py: the scorer compiled for Hopper without a GPU, and the
SASS loop census it reports."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is an optional dependency (pip install 'xflex[triton]')")
from bench.tools import sass_report  # noqa: E402

_REPO = Path(__file__).resolve().parents[2]

# Two loops, the second nested in a third; addresses as cuobjdump prints them.
_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0020*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0030*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0040*/               @P0 BRA 0x10 ;
        /*0050*/                   IADD3 R3, R3, 0x1, RZ ;
        /*0060*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0070*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0080*/               @P1 BRA 0x60 ;
        /*0090*/                   MUFU.EX2 R4, R4 ;
        /*00a0*/               @P2 BRA 0x50 ;
        /*00b0*/                   EXIT ;
"""


def test_innermost_hgmma_loops_and_their_steps():
    # 0x10-0x40: 4 instructions, one gsb0 group; 0x60-0x80: 3 instructions,
    # two groups; 0x50-0xa0 encloses the second, so it is not innermost.
    assert sass_report.hgmma_loops(_SASS) == [(4, 1), (3, 2)]


def test_key_tile_loop_outside_its_reduction_loop():
    # 0x50-0xa0 encloses 0x60-0x80: IADD3, MUFU and the branch are its own.
    assert sass_report.tile_loops(_SASS) == [(3, 1)]


def _run_tool(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "bench.tools.sass_report", *args]
    return subprocess.run(command, env=env, cwd=_REPO, capture_output=True, text=True, check=True)


@pytest.mark.parametrize("scorer", ["antidiagonal", "interleaved"])
def test_scorer_compiles_to_hopper_wgmma(scorer):
    # A fresh process: this suite runs Triton's interpreter, which cannot compile.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["--length", "8200", "--heads", "4", "--kv-heads", "2", "--block-mask", "--scorer", scorer]
    report = _run_tool(args, env)
    assert "HGMMA loop:" in report.stdout, "the reduction loop should issue HGMMA (wgmma), not HMMA"
    assert "key-tile loop:" in report.stdout
    assert "registers" in report.stdout


def test_gluon_scorer_compiles_within_hopper_limits():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["--kernel", "gluon", "--length", "8192", "--stride", "16", "--heads", "4", "--kv-heads", "2"]
    report = _run_tool(args, env)
    print(report.stdout)
    usage = re.search(r"local \(spills\) (\d+) B, shared (\d+) B", report.stdout)
    assert usage and int(usage[1]) == 0, "a partition spills registers"
    assert int(usage[2]) <= 227 * 1024, "more shared memory than an H100 block can have"
    assert "HGMMA loop:" in report.stdout
