"""Our Triton kernels (the fused cross network's update, the pooled lookup) run on the CPU
under Triton's interpreter, against their references: the product's self-checks
(``afmrec.models.kernels.selfcheck``, which the benchmark sweeps' ``--selfcheck`` run
too, and tests/test_cuda.py's GPU tests repeat compiled). ``make test`` installs Triton
for these; without it they skip."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")


@pytest.mark.parametrize("check", ["check_cross_update", "check_lookup"])
def test_kernel_matches_its_reference_under_the_interpreter(check):
    """Every tiling form the self-check covers, in a fresh process whose Triton is imported
    with ``TRITON_INTERPRET=1`` set. The lookup's: fp32, fp16 and int8 rows of mixed
    widths, of one narrow width and of width 128 (the original's 512-byte fp32 rows),
    empty bags, out-of-table ids; the autotuned launch and every tiling it tunes over,
    each exactly equal to the reference (a bag's rows added in id order whatever the
    tiling) and to FBGEMM's CPU kernel to float rounding. The update's: w kept in
    registers or read in chunks, with and without x_prev, codes of mixed widths with whole
    tables' rows among them, and x_0 read from memory (the original's rank-512 layers)."""
    code = f"from afmrec.models.kernels.selfcheck import {check}; {check}(verbose=True)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    # update: 5 shapes x 3 tilings + 3 mixed layouts x 2 tilings + 3 from x0; lookup: 3 x 3 x 9
    cases = {"check_cross_update": 24, "check_lookup": 81}[check]
    assert len(done.stdout.splitlines()) == cases, done.stdout[-2000:]


# The checks can fail: a kernel off its reference in one case is named (these run the
# checks in this process with the kernels' launches replaced, so no kernel runs).


def test_the_update_check_names_a_tiling_form_that_is_off(monkeypatch):
    """A launch that is off by 1e-4 (relative) only where w is read in chunks fails the
    check, which names those cases and passes the others."""
    from afmrec.models.kernels import cross, selfcheck

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def launch(*args):
        inputs, given = args[:8], args[8:]  # a mixed layout comes as its tensor and bias row
        layout = (cross.CodeLayout(tuple(map(tuple, given[0].tolist())), given[1], inputs[1].shape[1])
                  if given else None)
        x = cross.cross_update_reference(*inputs, layout)
        return x * (1 + 1e-4) if args[4].shape[1] > cross.MAX_RESIDENT_R else x

    monkeypatch.setattr(cross, "launch", launch)
    monkeypatch.setattr(cross, "launch_x0", cross.cross_update_x0_reference)
    with pytest.raises(AssertionError) as failed:
        selfcheck.check_cross_update()
    lines = str(failed.value).splitlines()
    # R above MAX_RESIDENT_R: R = 45 and 112 for the tiling of 32, R = 112 for that of 64,
    # R = 200 and 150 for all three; of the mixed layouts (two tilings) R = 200 for both,
    # R = 45 and 112 for that of 32
    assert lines[0] == "the fused cross network's update kernel: 13 case(s) off their reference:", lines
    assert all("relative error 1.0e-04, tolerance 1e-05" in line for line in lines[1:]), lines
    assert cross.MAX_RESIDENT_R == 128 and cross.BLOCK_B == 64  # the constants restored


def test_the_lookup_check_needs_exact_equality_under_the_interpreter(monkeypatch):
    """A lookup whose one tiling adds a bag's rows in another order (a float rounding off
    the reference) fails the check there."""
    from afmrec.models.kernels import lookup, selfcheck

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    odd = lookup.TILINGS[-1]

    def launch(rows, indices, offsets, tiling=None):
        out = lookup.pooled_lookup_reference(rows.weights, rows.tables, indices, offsets, rows.kind, rows.total_dim)
        if tiling == odd:
            out[0, 0] = torch.nextafter(out[0, 0], torch.tensor(float("inf")))
        return out

    monkeypatch.setattr(lookup, "launch", launch)
    with pytest.raises(AssertionError) as failed:
        selfcheck.check_lookup()
    lines = str(failed.value).splitlines()
    assert lines[0] == "the pooled lookup kernel: 9 case(s) off their reference:", lines
    assert all(f"{odd}:" in line and "must be equal" in line for line in lines[1:]), lines
