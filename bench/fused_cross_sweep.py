"""Tiling sweep of the fused cross network's kernel (``afmrec/models/cross_kernel.py``) at
the MLPerf DLRM-DCNv2 shape of ``afmrec bench speed``'s AFM 4x model (26 tables of
rank 32, cross layers of rank 112, the over arch's first factor 200 wide, batch 65,536),
against the plain serving path (the projection GEMM into x_0, per layer the two factor
GEMMs and the element-wise update, the head's GEMM), all TF32, timed in CUDA graphs.

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
LAYERS, RANK, HEAD = 3, 112, 200


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
    downs = [rand(RANK, n, scale=n ** -0.5) for _ in range(LAYERS)] + [rand(HEAD, n, scale=n ** -0.5)]
    down_b = [rand(d.shape[0], scale=0.1) for d in downs]
    ups, up_b = [rand(n, RANK, scale=0.1) for _ in range(LAYERS)], [rand(n, scale=0.1) for _ in range(LAYERS)]

    def plain() -> torch.Tensor:
        x0 = ck.interaction(dense, codes, nonempty, code_weight)
        x = x0
        for d, db, u, ub in zip(downs, down_b, ups, up_b):
            x = torch.addcmul(x, x0, torch.addmm(ub, torch.addmm(db, x, d.T), u.T))
        return torch.addmm(down_b[-1], x, downs[-1].T)

    up_t = torch.cat([u.T for u in ups]).contiguous()
    biases = [torch.ones(n, device=dev)] + up_b
    betas = torch.stack(biases).cumsum(0)
    downs_t, down_bp = [], []
    for d, db in zip(downs, down_b):
        wp = ck.padded(d.shape[0])
        downs_t.append(torch.cat([d.T, torch.zeros(n, wp - d.shape[0], device=dev)], 1).contiguous())
        down_bp.append(torch.cat([db, torch.zeros(wp - d.shape[0], device=dev)]))

    def fused(carry_from: int) -> torch.Tensor:
        ws, x = [], None
        for step in range(LAYERS + 1):
            if x is not None:
                w, u, beta = ws[-1], up_t[(step - 1) * RANK: step * RANK], biases[step]
            else:
                w = torch.cat(ws, 1) if ws else codes.new_empty(BATCH, 0)
                u, beta = up_t[: step * RANK], betas[step]
            keep = step < LAYERS and step + 1 >= carry_from
            z, kept = ck.cross_step(dense, codes, nonempty, code_weight, w, u, beta, x, downs_t[step],
                                    down_bp[step], downs[step].shape[0], keep)
            x = kept if keep else None
            ws.append(z)
        return z

    with torch.no_grad():
        want = plain()
        ref_ms = graphed_ms(plain)
        print(f"plain path (TF32 GEMMs + element-wise): {ref_ms:.3f} ms per batch of {BATCH}")
        results = []

        def trial(block_b, chunk, block_o, warps, stages, carry_from) -> None:
            ck.BLOCK_B, ck.CHUNK, ck.MAX_BLOCK_O, ck.NUM_WARPS, ck.NUM_STAGES = block_b, chunk, block_o, warps, stages
            name = f"BLOCK_B={block_b} CHUNK={chunk} MAX_BLOCK_O={block_o} warps={warps} stages={stages} carry_from={carry_from}"
            try:
                got = fused(carry_from)
                err = ((got - want).norm() / want.norm()).item()
                ms = graphed_ms(lambda: fused(carry_from))
            except Exception as e:  # noqa: BLE001  (out of shared memory, registers)
                print(f"{name}: failed ({type(e).__name__})")
                return
            results.append((ms, (block_b, chunk, block_o, warps, stages, carry_from)))
            print(f"{name}: {ms:.3f} ms ({ref_ms / ms:.2f}x the plain path), rel err {err:.1e}")
            sys.stdout.flush()

        for block_b, chunk, block_o, warps in itertools.product((64, 128), (32, 64), (128, 256), (4, 8)):
            trial(block_b, chunk, block_o, warps, 2, 2)
        for _, cfg in sorted(results)[:3]:
            for carry_from in (1, 3, 4):
                trial(*cfg[:5], carry_from)
            trial(*cfg[:4], 3, cfg[5])
        best = min(results)
        print(f"best: {best[0]:.3f} ms {best[1]}")


if __name__ == "__main__":
    main()
