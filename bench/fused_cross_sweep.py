"""Tiling sweep of the fused cross network's kernel (``afmrec.models.fused_cross``) at the
MLPerf DLRM-DCNv2 shape of ``afmrec bench speed``'s AFM 4x model, against the plain
serving path (the projection GEMM into x_0, per layer the two factor GEMMs and the
element-wise update, the over arch's first factor), both TF32, timed in CUDA graphs.

    python3 bench/fused_cross_sweep.py        # on a CUDA host, afmrec importable
"""

from __future__ import annotations

import itertools
import sys

import torch

import afmrec.models.fused_cross as fc

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
        x0 = fc.interaction(dense, codes, nonempty, code_weight)
        x = x0
        for d, db, u, ub in zip(downs, down_b, ups, up_b):
            x = x0 * torch.addmm(ub, torch.addmm(db, x, d.T), u.T) + x
        return torch.addmm(down_b[-1], x, downs[-1].T)

    up_t = torch.cat([u.T for u in ups]).contiguous()
    betas, beta = [], torch.ones(n, device=dev)
    for ub in up_b:
        betas.append(beta)
        beta = beta + ub
    betas.append(beta)
    downs_t = [fc.FusedCrossNet._padded_t(d).data for d in downs]
    biases = []
    for d, db in zip(downs, down_b):
        lin = torch.nn.Linear(d.shape[1], d.shape[0], device=dev)
        lin.bias.data.copy_(db)
        biases.append(fc.FusedCrossNet._padded_bias(lin).data)

    def fused() -> torch.Tensor:
        ws = codes.new_empty(BATCH, 0)
        for i in range(LAYERS + 1):
            z = fc.cross_down(dense, codes, nonempty, code_weight, ws, up_t[: i * RANK], betas[i],
                              downs_t[i], biases[i], downs[i].shape[0])
            if i < LAYERS:
                ws = torch.cat([ws, z], 1)
        return z

    with torch.no_grad():
        want = plain()
        ref_ms = graphed_ms(plain)
        print(f"plain path (TF32 GEMMs + element-wise): {ref_ms:.3f} ms per batch of {BATCH}")
        flops = 2 * BATCH * n * (4 * KP + sum(range(0, LAYERS * RANK + 1, RANK)) + LAYERS * RANK + HEAD)
        for block_b, chunk, warps, stages in itertools.product((64, 128), (64, 128), (4, 8), (1, 2)):
            fc.BLOCK_B, fc.CHUNK, fc.NUM_WARPS, fc.NUM_STAGES = block_b, chunk, warps, stages
            try:
                got = fused()
                err = ((got - want).norm() / want.norm()).item()
                ms = graphed_ms(fused)
            except Exception as e:  # noqa: BLE001  (out of shared memory, registers)
                print(f"BLOCK_B={block_b} CHUNK={chunk} warps={warps} stages={stages}: failed ({type(e).__name__})")
                continue
            print(f"BLOCK_B={block_b} CHUNK={chunk} warps={warps} stages={stages}: {ms:.3f} ms "
                  f"({ref_ms / ms:.2f}x the plain path, {flops / ms / 1e9:.0f} TFLOP/s), rel err {err:.1e}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
