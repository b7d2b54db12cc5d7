"""Tiling sweep of the fused cross network's update kernel (``models/kernels/cross.py``)
at the MLPerf DLRM-DCNv2 shape of ``afmrec bench speed``'s AFM 4x model (26 tables of
rank 32, cross layers of rank 112, batch 65,536), against the plain serving path (the
projection GEMM into x_0, per layer the two factor GEMMs and the element-wise update)
and, with ``--baseline``, against another version of the kernel's file at its own
tiling, all TF32, timed in CUDA graphs.

The sweep needs only torch and Triton (the kernel's files are loaded on their own);
``--selfcheck`` needs the installed package:

    python3 bench/fused_cross_sweep.py [--baseline OLD_cross.py] [--best best.json]
    TRITON_INTERPRET=1 python3 bench/fused_cross_sweep.py --selfcheck   # anywhere

``--best`` writes the fastest tiling's constants as JSON. ``--selfcheck`` runs the kernel
(Triton's interpreter on a CPU) against the float64 reference at small ragged shapes, in
both of its forms (w kept in registers, or read in chunks): the product's own check,
``afmrec.models.kernels.selfcheck.check_cross_update``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch

BATCH, FIELDS, DIM, K, KP = 65536, 26, 128, 32, 40
LAYERS, RANK = 3, 112
# (BLOCK_B, BLOCK_N, NUM_WARPS, TILES, NUM_STAGES)
TILINGS = [(64, 64, 4, t, st) for t in (1, 3, 6, 9) for st in (2, 3)] + [
    (b, n, wp, t, st) for b, n, wp, ts, sts in (
        (128, 64, 8, (3, 6), (2, 3)), (64, 128, 4, (3, 6), (2, 3)), (64, 32, 4, (6, 12, 27), (2, 3)),
        (32, 64, 4, (6, 9, 18, 27), (1, 2, 3)), (32, 64, 2, (9, 27, 54), (2, 3)), (32, 64, 1, (9, 27), (2,)),
        (16, 64, 2, (9, 27), (2,)), (16, 64, 4, (9,), (2,)), (16, 64, 1, (27,), (2,)), (32, 128, 4, (9, 27), (2,)),
        (32, 32, 4, (18, 54), (2,)), (32, 32, 2, (27, 54), (2,)), (32, 32, 1, (27,), (2,)), (64, 64, 4, (9,), (1,)),
        (64, 64, 2, (9, 27), (2,)), (64, 32, 2, (12, 27, 54, 108), (2,)), (64, 32, 1, (27,), (2,)),
        (128, 32, 4, (27, 54), (2,)), (128, 32, 2, (27,), (2,)), (64, 16, 2, (54,), (2,)), (128, 16, 2, (54,), (2,)))
    for t in ts for st in sts]
"""(BLOCK_B, BLOCK_N, NUM_WARPS, TILES, NUM_STAGES): all the tilings the H200 sweep timed
in its four parts (bench/fused_cross_sweep_h200.txt), and a few neighbours."""


def load(path: Path, name: str):
    """The kernel file ``path`` as a module, its op registered as ``name::cross_update``
    (two versions side by side)."""
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module  # Triton's and the dataclass machinery's lookups
    source = path.read_text().replace("afmrec::cross_update", f"{name}::cross_update")
    exec(compile(source.replace("torch.ops.afmrec.", f"torch.ops.{name}."), str(path), "exec"), module.__dict__)
    return module


def graphed_ms(fn, reps: int = 20) -> float:
    """Median milliseconds of one call of ``fn``, replayed from a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def selfcheck() -> None:
    """The update's self-check (:func:`afmrec.models.kernels.selfcheck.check_cross_update`,
    on the installed package), each case printed; raises AssertionError if one is off."""
    from afmrec.models.kernels.selfcheck import check_cross_update

    check_cross_update(verbose=True)
    print("selfcheck passed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path,
                        help="another version of models/kernels/cross.py, timed at its tiling")
    parser.add_argument("--best", type=Path, help="write the fastest tiling's constants here (JSON)")
    parser.add_argument("--selfcheck", action="store_true", help="check the kernel against float64 and stop")
    args = parser.parse_args()
    if args.selfcheck:
        return selfcheck()
    ck = load(Path(__file__).resolve().parents[1] / "models" / "kernels" / "cross.py", "sweep_kernel")
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rand = lambda *s, scale=1.0: torch.randn(*s, device=dev, generator=g) * scale  # noqa: E731
    n = (FIELDS + 1) * DIM
    dense, codes = rand(BATCH, DIM).relu(), rand(BATCH, FIELDS * K, scale=0.3)
    nonempty = (torch.rand(FIELDS, BATCH, device=dev, generator=g) > 0.1).float().T
    code_weight = torch.cat([rand(FIELDS, K + 1, DIM, scale=0.2), torch.zeros(FIELDS, KP - K - 1, DIM, device=dev)], 1)
    downs = [rand(RANK, n, scale=n ** -0.5) for _ in range(LAYERS)]
    down_b = [rand(RANK, scale=0.1) for _ in range(LAYERS)]
    ups, up_b = [rand(n, RANK, scale=0.1) for _ in range(LAYERS)], [rand(n, scale=0.1) for _ in range(LAYERS)]
    ups_t = [u.T.contiguous() for u in ups]
    betas = [up_b[0] + 1] + up_b[1:]
    w1 = torch.addmm(down_b[0], ck.interaction(dense, codes, nonempty, code_weight), downs[0].T)

    def plain() -> torch.Tensor:
        x0 = ck.interaction(dense, codes, nonempty, code_weight)
        x = x0
        for d, db, u, ub in zip(downs, down_b, ups, up_b):
            x = torch.addcmul(x, x0, torch.addmm(ub, torch.addmm(db, x, d.T), u.T))
        return x

    def fused(kernel) -> torch.Tensor:  # as FusedCrossNet: w_1 from the codes (given here)
        x = kernel.cross_update(dense, codes, nonempty, code_weight, w1, ups_t[0], betas[0], None)
        for i in range(1, LAYERS):
            x = kernel.cross_update(dense, codes, nonempty, code_weight, torch.addmm(down_b[i], x, downs[i].T),
                                    ups_t[i], betas[i], x)
        return x

    w, prev = rand(BATCH, RANK), rand(BATCH, n)
    moved = 2 * BATCH * n * 4 / 1e9  # GB: x_prev read, x written
    start = time.time()

    def measure(kernel, name: str) -> float:
        got = fused(kernel)
        err = ((got - want).norm() / want.norm()).item()
        ms = graphed_ms(lambda: fused(kernel))
        upd = graphed_ms(lambda: kernel.cross_update(dense, codes, nonempty, code_weight, w, ups_t[1], betas[1], prev))
        print(f"{name}: {ms:.3f} ms ({ref_ms / ms:.2f}x the plain path), rel err {err:.1e}; one update "
              f"{upd:.3f} ms ({moved / upd:.2f} TB/s over x_prev and x)")
        sys.stdout.flush()
        return ms

    with torch.no_grad():
        want = plain()
        ref_ms = graphed_ms(plain)
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; plain path (TF32 GEMMs + "
              f"element-wise): {ref_ms:.3f} ms per batch of {BATCH}")
        if args.baseline:
            measure(load(args.baseline, "baseline_kernel"), f"baseline {args.baseline.name}")
        results = []
        for tiling in TILINGS:
            ck.BLOCK_B, ck.BLOCK_N, ck.NUM_WARPS, ck.TILES, ck.NUM_STAGES = tiling
            name = "BLOCK_B={} BLOCK_N={} warps={} TILES={} stages={}".format(*tiling)
            try:
                results.append((measure(ck, name), tiling))
            except Exception as e:  # noqa: BLE001  (out of shared memory, registers)
                print(f"{name}: failed ({type(e).__name__}: {str(e)[:120]})")
        best_ms, best = min(results)
        print("best: {:.3f} ms ({:.2f}x the plain path) BLOCK_B={} BLOCK_N={} warps={} TILES={} stages={}; "
              "the sweep took {:.0f} s".format(best_ms, ref_ms / best_ms, *best, time.time() - start))
        if args.best:
            args.best.write_text(json.dumps(dict(zip(("BLOCK_B", "BLOCK_N", "NUM_WARPS", "TILES", "NUM_STAGES"), best))))


if __name__ == "__main__":
    main()
