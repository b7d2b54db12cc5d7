"""Tiling sweep of the fused cross network's update kernel (``afmrec/models/cross_kernel.py``)
at the MLPerf DLRM-DCNv2 shape of ``afmrec bench speed``'s AFM 4x model (26 tables of
rank 32, cross layers of rank 112, batch 65,536), against the plain serving path (the
projection GEMM into x_0, per layer the two factor GEMMs and the element-wise update),
all TF32, timed in CUDA graphs.

Needs only torch and Triton (the kernel's file is loaded on its own):

    python3 bench/fused_cross_sweep.py
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location(
    "cross_kernel", Path(__file__).resolve().parents[1] / "models" / "cross_kernel.py")
ck = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ck)

BATCH, FIELDS, DIM, K, KP = 65536, 26, 128, 32, 40
LAYERS, RANK = 3, 112


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


def main() -> None:
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
    betas = [torch.ones(n, device=dev), up_b[0] + 1] + up_b[1:]

    def plain() -> torch.Tensor:
        x0 = ck.interaction(dense, codes, nonempty, code_weight)
        x = x0
        for d, db, u, ub in zip(downs, down_b, ups, up_b):
            x = torch.addcmul(x, x0, torch.addmm(ub, torch.addmm(db, x, d.T), u.T))
        return x

    def fused() -> torch.Tensor:
        x = ck.cross_update(dense, codes, nonempty, code_weight, codes.new_empty(BATCH, 0), ups_t[0][:0],
                            betas[0], None)
        for i in range(LAYERS):
            x = ck.cross_update(dense, codes, nonempty, code_weight, torch.addmm(down_b[i], x, downs[i].T),
                                ups_t[i], betas[i + 1], x if i else None)
        return x

    w = rand(BATCH, RANK)
    prev = rand(BATCH, n)

    def one_update() -> torch.Tensor:
        return ck.cross_update(dense, codes, nonempty, code_weight, w, ups_t[1], betas[2], prev)

    with torch.no_grad():
        want = plain()
        ref_ms = graphed_ms(plain)
        gemm_ms = graphed_ms(lambda: torch.addmm(down_b[0], prev, downs[0].T))
        print(f"plain path (TF32 GEMMs + element-wise): {ref_ms:.3f} ms per batch of {BATCH}; "
              f"one down GEMM (reads x once) {gemm_ms:.3f} ms")
        results = []
        shapes = ((64, 64, 4), (128, 64, 4), (128, 64, 8), (256, 64, 8), (64, 32, 4), (128, 32, 4))
        for (block_b, block_n, warps), early, stages in itertools.product(shapes, (True, False), (2, 3)):
            ck.BLOCK_B, ck.BLOCK_N, ck.NUM_WARPS, ck.EARLY, ck.NUM_STAGES = block_b, block_n, warps, early, stages
            name = f"BLOCK_B={block_b} BLOCK_N={block_n} warps={warps} EARLY={early} stages={stages}"
            try:
                got = fused()
                err = ((got - want).norm() / want.norm()).item()
                ms = graphed_ms(fused)
                upd = graphed_ms(one_update)
            except Exception as e:  # noqa: BLE001  (out of shared memory, registers)
                print(f"{name}: failed ({type(e).__name__})")
                continue
            results.append((ms, name))
            moved = 2 * BATCH * n * 4 / 1e9  # GB: x_prev read, x written
            print(f"{name}: {ms:.3f} ms ({ref_ms / ms:.2f}x the plain path), rel err {err:.1e}; "
                  f"one update {upd:.3f} ms ({moved / upd:.2f} TB/s over x_prev and x)")
            sys.stdout.flush()
        best = min(results)
        print(f"best: {best[0]:.3f} ms ({ref_ms / best[0]:.2f}x the plain path) {best[1]}")


if __name__ == "__main__":
    main()
