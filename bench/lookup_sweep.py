"""Tiling sweep of our pooled-lookup kernel (``afmrec/models/lookup_kernel.py``) against
FBGEMM's inference kernel on the same packed rows, at ``afmrec bench speed``'s MLPerf
DLRM-DCNv2 shape: 26 tables (Criteo 1TB rows capped at 4M), MLPerf's multi-hot bag sizes,
power-law ids, batch 65,536; rows 128-wide fp32 (the original) and 32-wide fp32, fp16 and
int8 (AFM 4x), each timed in CUDA graphs.

    python3 bench/lookup_sweep.py [--best best.json] [--cases int8_32,fp32_32]
    TRITON_INTERPRET=1 python3 bench/lookup_sweep.py --selfcheck   # anywhere

FBGEMM runs without its bounds check (as the AOTInductor artifact calls it, with the id
check as separate ops); our kernel checks ids inline. ``--best`` writes the fastest
tiling over the cases (the sum of their times) as JSON; the kernel itself autotunes over a
few tilings of this grid (``lookup_kernel.TILINGS``). ``--selfcheck`` compares the kernel
with FBGEMM's forward (and the reference) on small tables, every row format and tiling
form, out-of-range ids and empty bags included.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_cross_sweep import graphed_ms  # noqa: E402

CASES = {"fp32_128": ("fp32", 128), "fp32_32": ("fp32", 32), "fp16_32": ("fp16", 32), "int8_32": ("int8", 32)}
# (BLOCK_B, BLOCK_J, NUM_WARPS, NUM_STAGES): the sweep's grid; the kernel autotunes over a
# few of these (lookup_kernel.TILINGS)
TILINGS = [(b, j, w, st) for b, j in ((8, 4), (16, 2), (16, 4), (32, 1), (32, 2), (32, 4), (64, 1), (64, 2), (64, 4),
                                      (128, 1), (128, 2)) for w in (2, 4, 8) for st in (1, 3)]


def _patch_interpreter() -> None:
    """Triton 3.6's interpreter takes int() of a 1-element array for a loop bound, which
    numpy 2.4 refuses: read its element instead."""
    import triton.runtime.interpreter as interp

    patch = interp._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched


def kernel_of(row_format: str, rows: list[int], dims: list[int], device: torch.device, seed: int = 0):
    """An FBGEMM inference kernel with these tables (no bounds check), its rows filled with
    valid random values (scales and biases finite)."""
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode, EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

    location = EmbeddingLocation.DEVICE if device.type == "cuda" else EmbeddingLocation.HOST
    kernel = IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(f"t{i}", n, d, SparseType(row_format), location) for i, (n, d) in enumerate(zip(rows, dims))],
        device=device, bounds_check_mode=BoundsCheckMode.NONE, output_dtype=SparseType.FP32)
    kernel.initialize_weights()
    g = torch.Generator(device=device).manual_seed(seed)
    for (w, _), d in zip(kernel.split_embedding_weights(split_scale_shifts=False), dims):
        if row_format == "int8":
            w[:, :4].view(torch.float16).uniform_(0.001, 0.01, generator=g)
            w[:, 4:4 + d].random_(0, 256, generator=g)
        else:
            dtype = torch.float32 if row_format == "fp32" else torch.float16
            w[:, :d * dtype.itemsize].view(dtype).normal_(generator=g)
    return kernel


def selfcheck() -> bool:
    """Prints each case's distance from the reference and from FBGEMM; whether all pass."""
    from afmrec.models import lookup_kernel as lk
    from afmrec.models.serving import packed_rows

    if os.environ.get("TRITON_INTERPRET") == "1":
        _patch_interpreter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    rows, batch = [50, 7, 300, 1], 37
    lengths = torch.randint(0, 6, (len(rows) * batch,), generator=g)
    ids = torch.randint(-2, 320, (int(lengths.sum()),), generator=g)  # some out of their tables
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    ok = True
    # every tiling the kernel autotunes over, and the autotuned launch (None); rows of every
    # format, narrow and mixed widths and the original's 128-wide rows (512 bytes in fp32)
    for row_format, dims, tiling in itertools.product(lk.ROW_KINDS, ([8, 16, 8, 4], [16] * 4, [128] * 4),
                                                      (None, *lk.TILINGS)):
        kernel = kernel_of(row_format, rows, dims, device)
        packed = packed_rows(kernel)
        assert packed is not None and packed.full == (len(set(dims)) == 1)
        args = (ids.int().to(device), offsets.int().to(device))
        valid = torch.where((ids >= 0) & (ids < torch.tensor(rows).repeat_interleave(batch).repeat_interleave(
            lengths)), ids, 0)  # FBGEMM without its bounds check gets checked ids
        want = kernel.forward(indices=valid.int().to(device), offsets=args[1]).cpu()
        ref = lk.pooled_lookup_reference(packed.weights, packed.tables, *args, packed.kind, packed.total_dim).cpu()
        got = lk.launch(packed, *args, tiling=tiling).cpu()
        scale = want.abs().max().item()
        err_ref, err_fbgemm = (got - ref).abs().max().item() / scale, (got - want).abs().max().item() / scale
        # FBGEMM's CUDA kernel dequantises int8 in float16 (its CPU one in float32, as ours);
        # under the interpreter the kernel adds a bag's rows in the reference's order: equal
        tolerance = 2e-3 if row_format == "int8" and device.type == "cuda" else 1e-6
        exact = device.type != "cuda"
        ok = ok and (torch.equal(got, ref) if exact else err_ref < 1e-6) and err_fbgemm < tolerance
        print(f"{row_format} dims {dims} {tiling or 'autotuned'}: max |diff| / max |value|: {err_ref:.1e} from the "
              f"reference{' (must be 0)' if exact else ''}, {err_fbgemm:.1e} from FBGEMM (tolerance {tolerance:.0e})")
    print(f"selfcheck {'passed' if ok else 'FAILED'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--best", type=Path, help="write the fastest tiling's constants here (JSON)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--selfcheck", action="store_true", help="check the kernel against FBGEMM and stop")
    args = parser.parse_args()
    if args.selfcheck:
        sys.exit(0 if selfcheck() else 1)
    from afmrec.models import lookup_kernel as lk
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
        kernel = kernel_of(row_format, list(shape.table_rows), dims, dev)
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
