"""Self-checks of our Triton kernels against their references, at small ragged shapes and in
every tiling form: on CUDA, or on a CPU under Triton's interpreter (``TRITON_INTERPRET=1``
set before Triton is imported, as ``tests/test_kernels_interpreted.py`` runs them)::

    TRITON_INTERPRET=1 python -c "from afmrec.models.kernels.selfcheck import check_lookup; check_lookup()"

Each check returns nothing and raises ``AssertionError`` naming every case that is off.
The benchmark sweeps' ``--selfcheck`` (``bench/fused_cross_sweep.py``,
``bench/lookup_sweep.py``) run these; ``tests/test_cuda.py`` repeats the update's check
compiled at larger shapes with :func:`random_update_inputs`.
"""

from __future__ import annotations

import itertools
import os
from typing import Optional

import torch

from . import cross, lookup


def _device() -> torch.device:
    """CUDA where there is one, else the CPU under Triton's interpreter."""
    if cross.triton is None:
        raise RuntimeError("the kernels' self-checks need Triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("without CUDA the kernels' self-checks run under Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before Triton is imported")
    return torch.device("cpu")


def _fail(failures: list[str], what: str) -> None:
    if failures:
        raise AssertionError(f"{what}: {len(failures)} case(s) off their reference:\n" + "\n".join(failures))


# --- the fused cross network's update ------------------------------------------------------


def random_update_inputs(batch: int, fields: int, k: int, dim: int, r: int, prev: bool,
                         seed: int = 0) -> list[Optional[torch.Tensor]]:
    """Random float32 CPU arguments of :func:`~afmrec.models.kernels.cross.cross_update`
    (for its checks, tests and benchmarks): dense, codes, nonempty (80% of bags),
    code_weight (F, KP, D) (rows as the serving module stacks them: K codes, the bias row,
    zeros to a multiple of 8, :func:`~afmrec.models.kernels.cross.code_weight_rows`), w,
    up_t, beta and prev (or None)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: torch.randn(*shape, generator=g) * scale  # noqa: E731
    n, kp = (fields + 1) * dim, cross.code_weight_rows(k, 8)
    return [rand(batch, dim), rand(batch, fields * k), (torch.rand(fields, batch, generator=g) > 0.2).float().T,
            torch.cat([rand(fields, k + 1, dim), torch.zeros(fields, kp - k - 1, dim)], 1), rand(batch, r),
            rand(r, n, scale=0.1), rand(n), rand(batch, n) if prev else None]


def random_layout_inputs(batch: int, widths: tuple[int, ...], dim: int, r: int, prev: bool,
                         seed: int = 0) -> tuple[list[Optional[torch.Tensor]], cross.CodeLayout]:
    """:func:`random_update_inputs` for fields of the given code widths (0: a whole
    table's D-wide row), one after another, and their :class:`~afmrec.models.kernels.
    cross.CodeLayout` (bias row: the widest code)."""
    layout = cross.CodeLayout.of_widths(widths, dim)
    inputs = random_update_inputs(batch, len(widths), 1, dim, r, prev, seed)
    g = torch.Generator().manual_seed(seed + 1)
    kp = cross.code_weight_rows(layout.bias_row, 8)
    inputs[1] = torch.randn(batch, layout.codes_width, generator=g)
    inputs[3] = torch.randn(len(widths), kp, dim, generator=g)
    return inputs, layout


UPDATE_SHAPES = [(70, 3, 5, 16, 0, False), (130, 4, 12, 32, 45, True), (100, 5, 32, 64, 112, True),
                 (65, 2, 8, 32, 200, False), (33, 3, 7, 16, 150, True)]
"""(batch, fields, K, D, R, prev) of the update's check: ragged batches, R = 0, R wider
than a resident w, K = 7 (the bias in the last of 8 rows: no zero row after it)."""

UPDATE_TILINGS = [(64, 64, 6, 128), (32, 16, 3, 32), (16, 32, 2, 64)]
"""(BLOCK_B, BLOCK_N, TILES, MAX_RESIDENT_R): w kept in registers or read in chunks."""

LAYOUT_SHAPES = [(70, (5, 0, 12), 16, 45, True), (65, (0, 8, 3, 0), 32, 200, False), (33, (32, 0), 64, 112, True)]
"""(batch, code widths (0: a whole table), D, R, prev): the default plan's kind of tables."""

X0_SHAPES = [(70, 3, 16, 40, False), (65, 2, 32, 512, True), (33, 5, 64, 200, True)]
"""(batch, fields, D, R, prev) of the check with x_0 read from memory (the original
model's cross layers, rank up to 512: w in chunks)."""


def _relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.cpu().double() - exact).norm() / exact.norm()).item()


def _double(tensors: list[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
    return [t.double() if t is not None else None for t in tensors]


def _on(tensors: list[Optional[torch.Tensor]], device: torch.device) -> list[Optional[torch.Tensor]]:
    return [t.to(device) if t is not None else None for t in tensors]


def check_cross_update(verbose: bool = False) -> None:
    """The update kernel (``cross.launch``, its tiling constants set in turn and restored)
    against the float64 reference, in both of its forms (w kept in registers, or read in
    chunks), with and without x_prev, and with x_0 read from memory (``cross.launch_x0``):
    relative error under 1e-5 (the interpreter's products are float32), 3e-3 on CUDA
    (TF32). ``verbose`` prints each case's error."""
    device = _device()
    tolerance = 3e-3 if device.type == "cuda" else 1e-5
    names = ("BLOCK_B", "BLOCK_N", "TILES", "MAX_RESIDENT_R")
    saved = {name: getattr(cross, name) for name in names}
    failures = []

    def record(case: str, err: float) -> None:
        if verbose:
            print(f"{case}: rel err {err:.1e}")
        if not err < tolerance:  # NaN fails too
            failures.append(f"{case}: relative error {err:.1e}, tolerance {tolerance:.0e}")

    try:
        for (batch, fields, k, dim, r, carry), tiling in itertools.product(UPDATE_SHAPES, UPDATE_TILINGS):
            for name, value in zip(names, tiling):
                setattr(cross, name, value)
            inputs = random_update_inputs(batch, fields, k, dim, r, carry, seed=batch)
            exact = cross.cross_update_reference(*_double(inputs))
            got = cross.launch(*_on(inputs, device))
            record(f"B={batch} F={fields} K={k} D={dim} R={r} prev={carry} "
                   + " ".join(f"{n}={v}" for n, v in zip(names, tiling)), _relative_error(got, exact))
        for (batch, widths, dim, r, carry), tiling in itertools.product(LAYOUT_SHAPES, UPDATE_TILINGS[:2]):
            for name, value in zip(names, tiling):
                setattr(cross, name, value)
            inputs, layout = random_layout_inputs(batch, widths, dim, r, carry, seed=batch)
            exact = cross.cross_update_reference(*_double(inputs), layout)
            got = cross.launch(*_on(inputs, device), layout.tensor(device), layout.bias_row)
            record(f"layout {widths}: B={batch} D={dim} R={r} prev={carry} "
                   + " ".join(f"{n}={v}" for n, v in zip(names, tiling)), _relative_error(got, exact))
        for name, value in zip(names, (64, 32, 12, 128)):
            setattr(cross, name, value)
        for batch, fields, dim, r, carry in X0_SHAPES:
            dense, codes, nonempty, cw, w, up_t, beta, prev = random_update_inputs(batch, fields, 4, dim, r, carry,
                                                                                   seed=batch)
            args = [cross.interaction(dense, codes, nonempty, cw), w, up_t, beta, prev]
            exact = cross.cross_update_x0_reference(*_double(args))
            got = cross.launch_x0(*_on(args, device))
            record(f"x0 given: B={batch} N={(fields + 1) * dim} R={r} prev={carry}", _relative_error(got, exact))
    finally:
        for name, value in saved.items():
            setattr(cross, name, value)
    _fail(failures, "the fused cross network's update kernel")


# --- the pooled lookup ---------------------------------------------------------------------


_INTERPRETER_PATCHED = False


def _patch_interpreter() -> None:
    """Triton 3.6's interpreter takes int() of a 1-element array for a loop bound, which
    numpy 2.4 refuses: read its element instead (once a process)."""
    global _INTERPRETER_PATCHED
    if _INTERPRETER_PATCHED:
        return
    import triton.runtime.interpreter as interp

    patch = interp._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    _INTERPRETER_PATCHED = True


def fbgemm_kernel(row_format: str, rows: list[int], dims: list[int], device: torch.device, seed: int = 0):
    """An FBGEMM inference kernel with these tables (no bounds check, float32 output), its
    rows filled with valid random values (scales and biases finite).

    Args: row_format: a :data:`~afmrec.models.kernels.lookup.ROW_KINDS` name; rows, dims:
    per table; device: CUDA, or the CPU (FBGEMM's host kernel)."""
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


LOOKUP_DIMS = ([8, 16, 8, 4], [16] * 4, [128] * 4)
"""Tables' widths of the lookup's check: mixed, one narrow width (no column masks), and the
original's 128-wide rows (512 bytes in fp32)."""


def check_lookup(verbose: bool = False) -> None:
    """The pooled lookup (``lookup.launch``) on FBGEMM's packed rows of every format
    (fp32, fp16, int8) and :data:`LOOKUP_DIMS`, with empty bags and ids outside their
    tables, autotuned and in every tiling it tunes over, against the reference (exactly
    equal under the interpreter: a bag's rows are added in id order whatever the tiling;
    to 1e-6 on CUDA) and FBGEMM's forward on the same rows (to float rounding; on CUDA
    int8 to 2e-3, FBGEMM dequantising in float16 there). Errors are relative to the
    largest pooled value. ``verbose`` prints each case."""
    from ..serving import packed_rows

    device = _device()
    if os.environ.get("TRITON_INTERPRET") == "1":
        _patch_interpreter()
    exact = device.type != "cuda"
    g = torch.Generator().manual_seed(0)
    rows, batch = [50, 7, 300, 1], 37
    lengths = torch.randint(0, 6, (len(rows) * batch,), generator=g)
    ids = torch.randint(-2, 320, (int(lengths.sum()),), generator=g)  # some out of their tables
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    args = (ids.int().to(device), offsets.int().to(device))
    in_table = (ids >= 0) & (ids < torch.tensor(rows).repeat_interleave(batch).repeat_interleave(lengths))
    valid = torch.where(in_table, ids, 0).int().to(device)  # FBGEMM without its bounds check gets checked ids
    failures = []
    for row_format, dims in itertools.product(lookup.ROW_KINDS, LOOKUP_DIMS):
        kernel = fbgemm_kernel(row_format, rows, dims, device)
        packed = packed_rows(kernel)
        assert packed is not None and packed.full == (len(set(dims)) == 1), (row_format, dims)
        want = kernel.forward(indices=valid, offsets=args[1]).cpu()
        ref = lookup.pooled_lookup_reference(packed.weights, packed.tables, *args, packed.kind,
                                             packed.total_dim).cpu()
        scale = want.abs().max().item()
        tolerance = 2e-3 if row_format == "int8" and device.type == "cuda" else 1e-6
        for tiling in (None, *lookup.TILINGS):
            got = lookup.launch(packed, *args, tiling=tiling).cpu()
            err_ref, err_fbgemm = (got - ref).abs().max().item() / scale, (got - want).abs().max().item() / scale
            case = f"{row_format} dims {dims} {tiling or 'autotuned'}"
            if verbose:
                print(f"{case}: max |diff| / max |value|: {err_ref:.1e} from the reference"
                      f"{' (must be 0)' if exact else ''}, {err_fbgemm:.1e} from FBGEMM (tolerance {tolerance:.0e})")
            if got.shape != ref.shape or not (torch.equal(got, ref) if exact else err_ref < 1e-6):
                failures.append(f"{case}: {err_ref:.1e} from the reference ({'must be equal' if exact else '1e-6'})")
            if not err_fbgemm < tolerance:
                failures.append(f"{case}: {err_fbgemm:.1e} from FBGEMM (tolerance {tolerance:.0e})")
    _fail(failures, "the pooled lookup kernel")
