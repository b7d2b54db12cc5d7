"""Tiling sweep of the chained cross network (``bench/cross_chain.py``: each layer's
``down`` product taken from ``x_0`` and the earlier layers' small vectors, the (B, N)
activations never written) at the MLPerf DLRM-DCNv2 shape of the AFM 4x model (26 tables
of rank 32, three cross layers of rank 112, batch 65,536), against the current path (the
fused update kernel of ``cross_kernel.py`` writing each x_l, cuBLAS ``down`` GEMMs reading
it), through the over arch's first low-rank factor (200 wide). All TF32, timed in CUDA
graphs.

The tilings' kernels are compiled first, in parallel; each tiling's four calls are then
timed on their own (few replays), and the five best tilings' whole chained paths again.

Needs only torch and Triton (the kernels' files are loaded on their own):

    python3 bench/cross_chain_sweep.py            # on a CUDA host
    TRITON_INTERPRET=1 python3 bench/cross_chain_sweep.py --selfcheck   # anywhere
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import triton


def _load(path: Path):
    """The module at ``path``, loaded on its own (not as part of afmrec)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ROOT = Path(__file__).resolve().parents[1]
_fused_sweep = _load(_ROOT / "bench" / "fused_cross_sweep.py")
ck, graphed_ms = _fused_sweep.ck, _fused_sweep.graphed_ms  # cross_kernel.py as that sweep loaded it
cc = _load(_ROOT / "bench" / "cross_chain.py")

BATCH, FIELDS, DIM, K, KP = 65536, 26, 128, 32, 40
LAYERS, RANK, OVER = 3, 112, 200
CHECK_ROWS = 4096
"""Rows of the batch checked against the float64 reference."""


def make_inputs(device: torch.device) -> dict:
    """Random model and batch at the MLPerf shape, scaled like bench/fused_cross_sweep.py's:
    dense (B, D), codes (B, F K), nonempty (B, F), code_weight (F, KP, D); per layer downs
    (RANK, N), mids (RANK, RANK) and mid_b (RANK,) (the rest of ``down`` and the first
    factor of ``up``, merged), ups_t (RANK, N) (row blocks of up_cat_t (L RANK, N)) and q
    (N,), and betas (L + 1, N), b_l = 1 + q_1 + ... + q_l; over_w (OVER, N); w_cat (B, L RANK)
    the chained path's buffer of the layers' w_l (zeros)."""
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s, scale=1.0: torch.randn(*s, device=device, generator=g) * scale
    n = (FIELDS + 1) * DIM
    up_cat_t, q = rand(LAYERS * RANK, n, scale=0.1), rand(LAYERS, n, scale=0.1)
    return {
        "dense": rand(BATCH, DIM).relu(), "codes": rand(BATCH, FIELDS * K, scale=0.3),
        "nonempty": (torch.rand(FIELDS, BATCH, device=device, generator=g) > 0.1).float().T,
        "code_weight": torch.cat([rand(FIELDS, K + 1, DIM, scale=0.2),
                                  torch.zeros(FIELDS, KP - K - 1, DIM, device=device)], 1),
        "downs": [rand(RANK, n, scale=n ** -0.5) for _ in range(LAYERS)],
        "mids": [rand(RANK, RANK, scale=RANK ** -0.5) for _ in range(LAYERS)],
        "mid_b": [rand(RANK, scale=0.1) for _ in range(LAYERS)],
        "up_cat_t": up_cat_t, "ups_t": list(up_cat_t.split(RANK)), "q": list(q),
        "betas": torch.cat([torch.ones(1, n, device=device), q]).cumsum(0),
        "over_w": rand(OVER, n, scale=n ** -0.5), "w_cat": torch.zeros(BATCH, LAYERS * RANK, device=device)}


def chain_calls(m: dict, rows: slice, tilings: list[dict],
                warmup: bool = False) -> list[Callable[[], torch.Tensor]]:
    """The chained path's four :func:`cross_chain.chain_down` calls on ``rows`` of the
    batch, one tiling each: call l (0-based) reads the first Kc = RANK l columns of
    ``m["w_cat"]``'s rows and returns u (rows, RANK), the over arch's factor's (rows, OVER)
    last."""
    dense, codes, nonempty, w_cat = (m[key][rows] for key in ("dense", "codes", "nonempty", "w_cat"))
    return [lambda l=l, down=down, tiling=tiling: cc.chain_down(
        dense, codes, nonempty, m["code_weight"], w_cat[:, :l * RANK], m["up_cat_t"][:l * RANK], m["betas"][l],
        down, warmup=warmup, **tiling) for l, (down, tiling) in enumerate(zip(m["downs"] + [m["over_w"]], tilings))]


def chained_path(m: dict, rows: slice, tilings: list[dict]) -> torch.Tensor:
    """The chained path on ``rows``: per layer l a chain_down call and the mid GEMM writing
    w_l = u_l mid_l^T + mid_b_l into w_cat's rows, then the over arch's factor. Returns
    (rows, OVER)."""
    calls = chain_calls(m, rows, tilings)
    for l, call in enumerate(calls[:-1]):
        torch.addmm(m["mid_b"][l], call(), m["mids"][l].T, out=m["w_cat"][rows, l * RANK:(l + 1) * RANK])
    return calls[-1]()


def current_path(m: dict) -> torch.Tensor:
    """The current path: x_0's update, per layer the down GEMM, the mid GEMM and the fused
    update (x_l written), then the over arch's factor. Returns (B, OVER)."""
    d, c, ne, cw = m["dense"], m["codes"], m["nonempty"], m["code_weight"]
    x = ck.cross_update(d, c, ne, cw, d.new_empty(d.shape[0], 0), m["ups_t"][0][:0], m["betas"][0], None)
    for i in range(LAYERS):
        w = torch.addmm(m["mid_b"][i], torch.mm(x, m["downs"][i].T), m["mids"][i].T)
        x = ck.cross_update(d, c, ne, cw, w, m["ups_t"][i], m["betas"][1] if i == 0 else m["q"][i], x if i else None)
    return torch.mm(x, m["over_w"].T)


def reference(m: dict, rows: slice) -> torch.Tensor:
    """The chained path's output on ``rows`` in float64 PyTorch ops (chain_down_reference)."""
    x = [m[key][rows].double() for key in ("dense", "codes", "nonempty")]
    cw, up_cat_t, betas = m["code_weight"].double(), m["up_cat_t"].double(), m["betas"].double()
    w_cat = x[0].new_empty(x[0].shape[0], 0)
    for l, down in enumerate(m["downs"] + [m["over_w"]]):
        u = cc.chain_down_reference(*x, cw, w_cat, up_cat_t[:w_cat.shape[1]], betas[l], down.double())
        if l < LAYERS:
            w_cat = torch.cat([w_cat, torch.addmm(m["mid_b"][l].double(), u, m["mids"][l].double().T)], 1)
    return u


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def tilings_for(bm: int, bn: int, br: int, bk: int, warps: int, stages: int) -> list[dict]:
    """chain_down's tiling for each of the four calls: ``br`` caps a call's R chunk at its
    R_out's padded width (256 takes 112 and 200 whole, 128 splits 200 in two, 64 splits 112
    in two and 200 in four)."""
    return [{"block_m": bm, "block_n": bn, "block_r": min(br, cc._padded(r)), "block_k": bk, "num_warps": warps,
             "num_stages": stages} for r in (RANK,) * LAYERS + (OVER,)]


def sweep() -> None:
    """Times the current path, compiles every tiling, screens them call by call, re-times
    the five best whole and each call at its own best tiling (module docstring)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    start = time.time()
    m = make_inputs(torch.device("cuda"))
    n, every, check = (FIELDS + 1) * DIM, slice(None), slice(0, CHECK_ROWS)
    flops = [2 * BATCH * (n * (l * RANK + r) + FIELDS * DIM * K) for l, r in enumerate((RANK,) * LAYERS + (OVER,))]
    with torch.no_grad():
        want = reference(m, check)
        current_ms = graphed_ms(lambda: current_path(m))
        print(f"current path (update kernel writing x_l, cuBLAS down, mid and over GEMMs): {current_ms:.3f} ms a batch "
              f"of {BATCH}, max err / max |u| {rel_err(current_path(m)[check], want):.1e}; the chained path's four "
              f"calls: {sum(flops) / 1e9:.0f} GFLOP a batch")
        u = torch.zeros(BATCH, RANK, device="cuda")
        mids_ms = LAYERS * graphed_ms(lambda: torch.addmm(m["mid_b"][0], u, m["mids"][0].T, out=m["w_cat"][:, :RANK]))

        configs = list(itertools.product((64, 128), (32, 64, 128), (64, 128, 256), (16, 32), (4, 8), (2, 3)))
        with ThreadPoolExecutor(os.cpu_count()) as pool, triton.AsyncCompileMode(pool, ignore_errors=True):
            for config in configs:
                for call in chain_calls(m, every, tilings_for(*config), warmup=True):
                    call()
        print(f"{len(configs)} tilings compiled, {time.time() - start:.0f} s since the start")

        screened = []  # (total ms, name, tilings) of the tilings whose four calls ran
        best_calls = [(float("inf"), "", {})] * (LAYERS + 1)  # per call: (ms, name, tiling)
        for config in configs:
            name = "BM={} BN={} BR={} BK={} warps={} stages={}".format(*config)
            tilings, call_ms, failures = tilings_for(*config), [], []
            for i, call in enumerate(chain_calls(m, every, tilings)):
                try:
                    call_ms.append(graphed_ms(call, reps=5))
                except Exception as e:  # noqa: BLE001  (out of shared memory, registers)
                    call_ms.append(None)
                    failures.append(f"call {i} {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                    continue
                if call_ms[i] < best_calls[i][0]:
                    best_calls[i] = (call_ms[i], name, tilings[i])
            tflops = " ".join("-" if ms is None else f"{f / ms / 1e9:.0f}" for f, ms in zip(flops, call_ms))
            if failures:
                print(f"{name}: failed ({'; '.join(failures)}); TFLOP/s of the calls {tflops}")
                continue
            total = sum(call_ms) + mids_ms
            screened.append((total, name, tilings))
            print(f"{name}: {total:.3f} ms ({current_ms / total:.2f}x the current path; calls timed apart), "
                  f"TFLOP/s of the calls {tflops}, max err / max |u| "
                  f"{rel_err(chained_path(m, check, tilings), want):.1e}")
            sys.stdout.flush()

        print("\nthe whole chained path at the five best tilings:")
        results = []
        for _, name, tilings in sorted(screened, key=lambda r: r[0])[:5]:
            ms = graphed_ms(lambda tilings=tilings: chained_path(m, every, tilings))
            results.append((ms, name))
            print(f"{name}: {ms:.3f} ms ({current_ms / ms:.2f}x the current path)")
        tilings = [tiling for _, _, tiling in best_calls]
        ms = graphed_ms(lambda: chained_path(m, every, tilings))
        print(f"each call at its own best tiling ({'; '.join(name for _, name, _ in best_calls)}): {ms:.3f} ms "
              f"({current_ms / ms:.2f}x the current path), max err / max |u| "
              f"{rel_err(chained_path(m, check, tilings), want):.1e}")
        best = min(results)
        print(f"best tiling: {best[0]:.3f} ms ({current_ms / best[0]:.2f}x the current path) {best[1]}; "
              f"the sweep took {time.time() - start:.0f} s")


def selfcheck() -> None:
    """chain_down and chain_down_reference against cross_update_reference @ down^T in
    float64 at small shapes with ragged edges (B, Kc, R_out not multiples of the tiles), on
    CUDA or, with TRITON_INTERPRET=1, on the CPU (whose interpreter takes the products in
    fp32, not TF32: a tighter tolerance)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s, scale=1.0: torch.randn(*s, device=device, generator=g) * scale
    batch, fields, k, kp = 100, 3, 8, 16
    tolerance, worst = 5e-3 if device.type == "cuda" else 1e-4, 0.0
    for dim, kc, r_out in itertools.product((32, 64), (0, 24, 40), (24, 40)):
        n = (fields + 1) * dim
        dense, codes = rand(batch, dim).relu(), rand(batch, fields * k, scale=0.3)
        nonempty = (torch.rand(fields, batch, device=device, generator=g) > 0.2).float().T
        cw = torch.cat([rand(fields, k + 1, dim, scale=0.2), torch.zeros(fields, kp - k - 1, dim, device=device)], 1)
        w = rand(batch, 48)[:, :kc]  # the first Kc columns of a wider buffer
        up_t = rand(n, kc, scale=0.1).T  # a transposed view
        beta, down = rand(n, scale=0.1) + 1, rand(r_out, n, scale=n ** -0.5)
        args = (dense, codes, nonempty, cw, w, up_t, beta)
        want = ck.cross_update_reference(*(t.double() for t in args), None) @ down.double().T
        ref_err = rel_err(cc.chain_down_reference(*args, down), want)
        for bm, bn, br, bk in ((16, 16, 16, 16), (32, 32, 32, 16), (64, 64, 64, 32)):
            err = rel_err(cc.chain_down(*args, down, block_m=bm, block_n=bn, block_r=br, block_k=bk), want)
            worst = max(worst, err)
            print(f"D={dim} Kc={kc} R_out={r_out} block_m={bm} block_n={min(bn, dim)} block_r={br} block_k={bk}: "
                  f"max err / max |u| {err:.1e} (reference {ref_err:.1e})")
    print(f"selfcheck {'passed' if worst < tolerance else 'FAILED'}: worst {worst:.1e} (tolerance {tolerance:.0e})")


if __name__ == "__main__":
    selfcheck() if "--selfcheck" in sys.argv else sweep()
