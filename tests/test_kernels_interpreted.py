"""Our Triton kernels (the fused cross network's update, the pooled lookup) run on the CPU
under Triton's interpreter, against their references: the self-checks of their benchmark
scripts, which tests/test_cuda.py's GPU tests repeat compiled. ``make test`` installs
Triton for these; without it they skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", ["fused_cross_sweep.py", "lookup_sweep.py"])
def test_kernel_matches_its_reference_under_the_interpreter(script):
    """Every tiling form the self-check covers. The lookup's: fp32, fp16 and int8 rows of
    mixed widths, of one narrow width and of width 128 (the original's 512-byte fp32
    rows), empty bags, out-of-table ids; the autotuned launch and every tiling it tunes
    over, each exactly equal to the reference (a bag's rows added in id order whatever
    the tiling) and to FBGEMM's CPU kernel to float rounding. The update's: w kept in
    registers or read in chunks, with and without x_prev, and x_0 read from memory (the
    original's rank-512 layers)."""
    done = subprocess.run([sys.executable, str(BENCH / script), "--selfcheck"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "selfcheck passed" in done.stdout, done.stdout[-2000:]
