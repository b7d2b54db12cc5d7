"""Tiling sweep of our pooled-lookup kernel (``models/kernels/lookup.py``) against
FBGEMM's inference kernel on the same packed rows, at ``afmrec bench speed``'s MLPerf
DLRM-DCNv2 shape: 26 tables (Criteo 1TB rows capped at 4M), MLPerf's multi-hot bag sizes,
power-law ids, batch 65,536; rows 128-wide fp32 (the original) and 32-wide fp32, fp16 and
int8 (AFM 4x), each timed in CUDA graphs.

    python3 bench/lookup_sweep.py [--best best.json] [--cases int8_32,fp32_32]
    TRITON_INTERPRET=1 python3 bench/lookup_sweep.py --selfcheck   # anywhere

FBGEMM runs without its bounds check (as the AOTInductor artifact calls it, with the id
check as separate ops); our kernel checks ids inline. ``--best`` writes the fastest
tiling over the cases (the sum of their times) as JSON; the kernel itself autotunes over a
few tilings of this grid (``lookup.TILINGS``). ``--selfcheck`` compares the kernel with
FBGEMM's forward (and the reference) on small tables, every row format and tiling form,
out-of-range ids and empty bags included: the product's own check,
``afmrec.models.kernels.selfcheck.check_lookup``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_cross_sweep import graphed_ms  # noqa: E402

CASES = {"fp32_128": ("fp32", 128), "fp32_32": ("fp32", 32), "fp16_32": ("fp16", 32), "int8_32": ("int8", 32)}
# (BLOCK_B, BLOCK_J, NUM_WARPS, NUM_STAGES): the sweep's grid; the kernel autotunes over a
# few of these (lookup.TILINGS)
TILINGS = [(b, j, w, st) for b, j in ((8, 4), (16, 2), (16, 4), (32, 1), (32, 2), (32, 4), (64, 1), (64, 2), (64, 4),
                                      (128, 1), (128, 2)) for w in (2, 4, 8) for st in (1, 3)]


def selfcheck() -> None:
    """The lookup's self-check (:func:`afmrec.models.kernels.selfcheck.check_lookup`), each
    case printed; raises AssertionError if one is off."""
    from afmrec.models.kernels.selfcheck import check_lookup

    check_lookup(verbose=True)
    print("selfcheck passed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--best", type=Path, help="write the fastest tiling's constants here (JSON)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--selfcheck", action="store_true", help="check the kernel against FBGEMM and stop")
    args = parser.parse_args()
    if args.selfcheck:
        return selfcheck()
    from afmrec.models.kernels import lookup as lk
    from afmrec.models.kernels.selfcheck import fbgemm_kernel
    from afmrec.models.serving import packed_rows
    from afmrec.pipeline.benchmarks.speed import SpeedShape, make_batches

    lk.MAX_ROW_BYTES = 2**30  # time every case, the wide rows FBGEMM keeps included
    dev, shape, start = torch.device("cuda"), SpeedShape(), time.time()
    kjt = make_batches(shape, shape.infer_batch, 1, dev, seed=1)[0].sparse_features
    ids, offsets = kjt.values().int(), kjt.offsets().int()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; {len(shape.table_rows)} tables, "
          f"{sum(shape.table_rows):,} rows, batch {shape.infer_batch}, {ids.numel():,} ids")
    totals: dict[tuple, list[float]] = {}
    for case in args.cases.split(","):
        row_format, dim = CASES[case]
        dims = [dim] * len(shape.table_rows)
        kernel = fbgemm_kernel(row_format, list(shape.table_rows), dims, dev)
        packed = packed_rows(kernel)
        want = kernel.forward(indices=ids, offsets=offsets)
        fbgemm = graphed_ms(lambda: kernel.forward(indices=ids, offsets=offsets))
        row_bytes = packed.tables[1, 0].item() * packed.weights.element_size()
        print(f"## {case}: rows of {row_bytes} bytes; FBGEMM {fbgemm:.3f} ms "
              f"({ids.numel() * row_bytes / fbgemm / 1e9:.2f} TB/s of rows)")
        results = []
        for tiling in TILINGS:
            name = "BLOCK_B={} BLOCK_J={} warps={} stages={}".format(*tiling)
            t = lk.Tiling(*tiling)
            try:
                got = lk.launch(packed, ids, offsets, tiling=t)
                err = ((got - want).abs().max() / want.abs().max()).item()
                ms = graphed_ms(lambda: lk.launch(packed, ids, offsets, tiling=t))
            except Exception as e:  # noqa: BLE001  (out of registers or shared memory)
                print(f"{name}: failed ({type(e).__name__}: {str(e)[:120]})")
                continue
            results.append((ms, tiling))
            totals.setdefault(tiling, []).append(ms)
            print(f"{name}: {ms:.3f} ms ({fbgemm / ms:.2f}x FBGEMM), max rel diff {err:.1e}")
            sys.stdout.flush()
        ms, tiling = min(results)
        print("{} best: {:.3f} ms ({:.2f}x FBGEMM) BLOCK_B={} BLOCK_J={} warps={} stages={}".format(
            case, ms, fbgemm / ms, *tiling))
        del kernel, packed, want
        torch.cuda.empty_cache()
    cases = len(args.cases.split(","))
    best = min((sum(ms), t) for t, ms in totals.items() if len(ms) == cases)[1]
    print("best over the cases: BLOCK_B={} BLOCK_J={} warps={} stages={}; the sweep took {:.0f} s".format(
        *best, time.time() - start))
    if args.best:
        args.best.write_text(json.dumps(dict(zip(("BLOCK_B", "BLOCK_J", "NUM_WARPS", "NUM_STAGES"), best))))


if __name__ == "__main__":
    main()
