"""``afmrec export``: the serving artifact of a (compressed) model.

The tables go through ``torchrec.inference.modules.quantize_embeddings`` (FBGEMM's
inference kernels, rows in fp32, fp16, int8 or int4), as TorchRec's inference stack makes
its models. The artifact is one file in one of two formats:

* ``torchscript`` (``.pt``, the default): traced with ``torchrec.fx.symbolic_trace`` and
  compiled with ``torch.jit.script``; loads with ``torch.jit.load``.
* ``aoti`` (``.pt2``): ``torch.export``, then AOTInductor's ahead-of-time compiled package
  (generated kernels, weights in one blob); loads with
  ``torch._inductor.aoti_load_package``. On CUDA it holds what TorchScript cannot: an AFM
  DLRM-DCNv2's cross network computed from the codes by one Triton kernel per layer
  (``afmrec.models.fused_cross``). FBGEMM's bounds check, which mutates a tensor that
  export cannot lift, is replaced by the same rule in plain ops: an id outside its table
  reads row 0 (FBGEMM's ``WARNING`` mode, without the warning count).

Either file holds the code of every module it uses, so it loads with ``import torchrec``
(which registers FBGEMM's operators) without ``afmrec`` installed.

Its forward takes plain tensors, so a server needs no TorchRec type to call it::

    import torch, torchrec  # torchrec (or fbgemm_gpu) registers the FBGEMM operators
    model = torch.jit.load("model.pt", map_location="cuda")  # or, for the aoti format:
    import ctypes, os  # first, on Linux (see :func:`share_libstdcxx`):
    ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
    model = torch._inductor.aoti_load_package("model.pt2")
    logits = model(dense, values, lengths)  # (B, N) float, (L,) int64, (F * B,) int32 -> (B,)

``lengths`` holds, feature by feature in the order of ``features`` in the metadata, the
bag size of each of the B rows. The metadata (``afmrec.json`` inside the file,
:func:`read_metadata`) names the format, the features, the dense width, the table dtype,
the parameter count and the model it came from.
"""

# No `from __future__ import annotations`: torch.fx and TorchScript read the annotations of
# ServingModule.forward as types.
import copy
import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from afmrec.models import ModelConfig

from .artifacts import SERVING, atomic_file, versions
from .budget import ROW_ALIGNMENT
from .errors import InputError
from .evaluate import count_parameters

FORMAT = "afmrec.serving/1"
METADATA = "afmrec.json"
TableDtype = Literal["fp32", "fp16", "int8", "int4"]
ArtifactFormat = Literal["torchscript", "aoti"]
SUFFIX: dict[str, str] = {"torchscript": ".pt", "aoti": ".pt2"}
TABLE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "int8": torch.qint8,
    "int4": torch.quint4x2,
}


KERNEL_CHOICES = ("measure", "ours", "stock")
MEASURE_BATCH = 16384
"""Rows of the example batch on which ``kernels="measure"`` times each kernel."""


@dataclass(frozen=True)
class ExportConfig:
    """How the artifact is made.

    Args:
        tables: row format of every table (``int8``/``int4``: TorchRec's row-wise
            quantisation, a scale and bias per row).
        check_batch: rows of the batch on which the written file is loaded back and
            compared with the module it came from (0: no check).
        format: ``torchscript`` or ``aoti`` (module docstring).
        kernels: for ``aoti`` on CUDA, which of our kernels (the pooled lookup, the fused
            cross network) the artifact holds: ``measure`` (each where it is faster than
            FBGEMM's lookup or the plain network on an example batch of
            :data:`MEASURE_BATCH` rows: :func:`afmrec.pipeline.kernel_choice.choose_kernels`),
            ``ours`` (both wherever they apply) or ``stock`` (neither).
    """

    tables: TableDtype = "fp32"
    check_batch: int = 256
    format: ArtifactFormat = "torchscript"
    kernels: str = "measure"

    def __post_init__(self) -> None:
        if self.tables not in TABLE_DTYPES:
            raise InputError(f"tables must be one of {sorted(TABLE_DTYPES)}, got {self.tables!r}")
        if self.format not in SUFFIX:
            raise InputError(f"format must be one of {sorted(SUFFIX)}, got {self.format!r}")
        if self.check_batch < 0:
            raise InputError(f"check_batch must be >= 0, got {self.check_batch}")
        if self.kernels not in KERNEL_CHOICES:
            raise InputError(f"kernels must be one of {KERNEL_CHOICES}, got {self.kernels!r}")


class ServingModule(nn.Module):
    """A CTR model behind a forward of plain tensors.

    Args:
        model: maps ``(dense (B, N), KJT)`` to logits (B, 1).
        features: the KJT's keys, in the order of ``lengths``.
        tables: the row format of its tables (recorded in the artifact).
        params: parameters of the float model it was made from (recorded).
    """

    def __init__(self, model: nn.Module, features: list[str], tables: str = "fp32", params: int = 0,
                 rows: list[int] | None = None) -> None:
        super().__init__()
        self.model = model
        self.features = features
        self.tables = tables
        self.params = params
        self.clamp_ids = False  # set while exporting to AOTInductor (module docstring)
        if rows is not None:
            self.register_buffer("id_limits", torch.tensor(rows, dtype=torch.int64,
                                                           device=next(model.parameters()).device))

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Args: dense (B, N) float32; values (L,) int64 ids; lengths (F * B,) int32.
        Returns: logits (B,)."""
        if self.clamp_ids:
            values = self.clamped(values, lengths)
        # not from_lengths_sync: nothing here needs the per-feature id counts on the host
        kjt = KeyedJaggedTensor(keys=self.features, values=values, lengths=lengths)
        return self.model(dense, kjt).squeeze(-1)

    def clamped(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``values`` with every id outside its feature's table (``id_limits``) made 0."""
        # each bag's limit (lengths run feature by feature), repeated over the bag's ids:
        # one short segment per bag, which the kernel spreads over threads (repeated over
        # the F features' long segments instead, it took 1.4 ms a batch of 65,536 on an
        # H200, longer than the lookup)
        per_bag = self.id_limits.unsqueeze(1).expand(-1, lengths.shape[0] // len(self.features)).reshape(-1)
        limit = torch.repeat_interleave(per_bag, lengths, output_size=values.shape[0])
        return torch.where((values >= 0) & (values < limit), values, torch.zeros_like(values))


def serving_module(model: nn.Module, features: list[str], tables: TableDtype = "fp32",
                   inplace: bool = False, fuse_cross: bool = False,
                   rows: list[int] | None = None) -> ServingModule:
    """``model`` with its tables on FBGEMM's inference kernels, the projections of its
    low-rank tables as one batched GEMM where they all have one rank
    (``LowRankEmbeddingBagCollection.fuse_projections_``) and its serving form
    (``afmrec.models.serving``: DLRM-DCNv2 assembles its cross input in one buffer, and a
    collection of one FBGEMM kernel is called on the input's ids directly, ``FlatLookup``,
    so that serving reads nothing back to the host), in eval mode.

    Args:
        model: an unsharded model (``afmrec.models.build_model``, compressed or not).
        features: sparse feature names in input order.
        tables: row format of the tables.
        inplace: convert ``model`` itself instead of a copy (saves a copy of the tables
            on the device; ``model`` is then no longer a float model).
        fuse_cross: compute DLRM-DCNv2's cross network from the codes where the model
            allows (``afmrec.models.fused_cross``; its Triton kernel on CUDA, for the
            AOTInductor format, which TorchScript cannot hold).
        rows: each feature's table rows (needed by the AOTInductor format's id check).
    """
    from torchrec.inference.modules import quantize_embeddings

    from afmrec.models import LowRankEmbeddingBagCollection
    from afmrec.models.serving import flatten_lookups_, serving_form

    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

    params = count_parameters(model)
    served = model if inplace else copy.deepcopy(model)
    for m in served.modules():
        if isinstance(m, LowRankEmbeddingBagCollection):
            m.fuse_projections_()
    # rows as the serving device's kernels take them and a rank plan counts them (TorchRec
    # pads to 16 bytes everywhere unless told otherwise; FBGEMM's CPU kernels need no padding)
    alignment = ROW_ALIGNMENT[next(model.parameters()).device.type]
    quant_prep_customize_row_alignment(served, [EmbeddingBagCollection], alignment)
    served = serving_form(quantize_embeddings(served, dtype=TABLE_DTYPES[tables], inplace=True), fuse_cross)
    flatten_lookups_(served, list(features))
    return ServingModule(served, list(features), tables, params, rows).eval()


def script(module: ServingModule) -> torch.jit.ScriptModule:
    """TorchRec's route to TorchScript: fx trace (KJT-aware), then script."""
    import torchrec.fx

    return torch.jit.script(torchrec.fx.symbolic_trace(module))


def example_batch(config: ModelConfig, batch_size: int, device: torch.device | str = "cpu",
                  seed: int = 0) -> Batch:
    """Random rows of the model's input schema: bags of 0 to 3 ids (so some are empty)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(config.tables), batch_size), generator=g)
    values = torch.cat([
        torch.randint(0, t.num_embeddings, (int(n.sum()),), generator=g)
        for t, n in zip(config.tables, lengths)
    ])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[t.name for t in config.tables], values=values, lengths=lengths.flatten().int())
    dense = torch.randn(batch_size, config.num_dense, generator=g)
    return Batch(dense, kjt, torch.zeros(batch_size)).to(torch.device(device))


def call(module: nn.Module, batch: Batch) -> torch.Tensor:
    """Runs a serving module (eager or loaded) on a batch; returns logits (B,)."""
    kjt = batch.sparse_features
    with torch.no_grad():
        return module(batch.dense_features, kjt.values(), kjt.lengths().int())


def export_model(
    model: nn.Module,
    config: ModelConfig,
    out: str | Path,
    export: ExportConfig = ExportConfig(),
    *,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes the TorchScript artifact of ``model`` to ``out`` (atomically).

    Args:
        model: an unsharded model on the device it will serve on (left unchanged).
        config: its architecture (feature names, dense width).
        out: the ``.pt`` file to write.
        export: table format and check.
        source: what to record about the model it came from (``model.json`` fields).
        overwrite: replace an existing file.

    Returns:
        The metadata written into the file (plus ``check_max_abs_diff``).
    """
    device = next(model.parameters()).device
    ours = export.format == "aoti" and device.type == "cuda"
    served = serving_module(model, [t.name for t in config.tables], export.tables, fuse_cross=ours,
                            rows=[t.num_embeddings for t in config.tables])
    lookup = cross = ours and export.kernels != "stock"
    if ours and export.kernels == "measure":
        from .kernel_choice import choose_kernels

        choice = choose_kernels(served, example_batch(config, MEASURE_BATCH, device), device)
        lookup, cross = choice.use_lookup, choice.use_cross
    return write_artifact(served, config, out, check_batch=export.check_batch, source=source,
                          overwrite=overwrite, format=export.format, lookup=lookup, cross=cross)


def write_artifact(
    served: ServingModule,
    config: ModelConfig,
    out: str | Path,
    *,
    check_batch: int = 256,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
    format: ArtifactFormat = "torchscript",
    lookup: bool | None = None,
    cross: bool | None = None,
) -> dict[str, Any]:
    """Compiles a serving module (scripts it, or exports and AOT-compiles it) and writes it
    to ``out`` (atomically), with its metadata.

    With ``check_batch`` rows, the written file is loaded back and its logits compared with
    ``served`` on an example batch; a mismatch beyond float rounding stops the export and
    writes nothing. ``served`` is left serving the form the file holds: with our kernels
    for ``aoti`` (a fused cross network, Triton lookups on CUDA), without for
    ``torchscript`` (:func:`afmrec.models.serving.use_kernels_`).
    """
    from afmrec.models.serving import use_kernels_

    device = next(served.parameters()).device  # the dense part serves where the tables do
    aoti = format == "aoti"  # TorchScript cannot hold the Triton kernels
    kernels = use_kernels_(served, aoti, lookup=lookup if aoti else False, cross=cross if aoti else False)
    metadata = {
        "format": FORMAT,
        "artifact": format,
        "cross": kernels["cross"],
        "lookup": kernels["lookup"],
        "features": list(served.features),
        "num_dense": config.num_dense,
        "dense_names": list(config.dense_names) if config.dense_names is not None else None,
        "arch": config.arch,
        "tables": served.tables,
        "params": served.params,
        "device": str(device),
        "source": source or {},
        "versions": versions(),
        "forward": "logits (B,) = model(dense (B, num_dense) float32 (columns as dense_names), values (L,) int64, "
                   "lengths (len(features) * B,) int32, feature-major)",
    }
    scripted = script(served) if format == "torchscript" else None
    with atomic_file(out, overwrite=overwrite, kind=SERVING) as tmp:
        if scripted is None:
            aoti_package(served, config, tmp, metadata)
        else:
            _save_script(scripted, tmp, metadata)
        if check_batch:
            batch = example_batch(config, check_batch, device)
            loaded, _ = load_artifact(tmp, device)
            want, got = call(served, batch), call(loaded, batch)
            diff = (want - got).abs().max().item()
            if not torch.allclose(want, got, rtol=1e-5, atol=1e-5):
                raise InputError(f"exported model differs from the module it came from (max |diff| {diff:.3g})")
            metadata["check_max_abs_diff"] = diff
    # Tracing and scripting leave reference cycles that hold ``served``'s tables; collect
    # them now, or a caller's ``del`` frees no device memory (GPU memory does not trigger
    # Python's collector: the speed benchmark ran out of memory that way).
    del scripted
    gc.collect()
    return metadata


def _save_script(scripted: torch.jit.ScriptModule, path: Path, metadata: dict[str, Any]) -> None:
    """Writes the TorchScript file with its metadata.

    It is assembled in memory (one more copy of the artifact's size, for the moment of
    the write) and written by Python: torch's own file writer, when a write fails (disk
    full, file size limit), fails again in its destructor and aborts the process
    (``std::terminate``) instead of raising, which would leave the temporary file behind.
    """
    data = scripted.save_to_buffer(_extra_files={METADATA: json.dumps(metadata, indent=1)})
    with open(path, "wb") as f:
        f.write(data)


class _ExportableIds:
    """While entered: ``served``'s FBGEMM lookups skip FBGEMM's bounds check (it mutates a
    buffer that TorchRec keeps out of the module tree, which ``torch.export`` cannot lift)
    and, if it has any, ``served`` applies the same rule itself
    (:meth:`ServingModule.clamped`); our lookup kernel applies it inline."""

    def __init__(self, served: ServingModule) -> None:
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
            IntNBitTableBatchedEmbeddingBagsCodegen,
        )

        if not hasattr(served, "id_limits"):
            raise InputError("the aoti format needs each feature's table rows (serving_module(rows=...))")
        self.served = served
        self.tables: list[Any] = []
        for m in served.modules():
            if getattr(m, "use_kernel", False):  # a FlatLookup served by our kernel
                continue
            for tbe in getattr(m, "_emb_modules", ()):
                if isinstance(tbe, IntNBitTableBatchedEmbeddingBagsCodegen):
                    self.tables.append((tbe, tbe.bounds_check_mode_int))

    def __enter__(self) -> None:
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

        self.served.clamp_ids = bool(self.tables)
        for tbe, _ in self.tables:
            tbe.bounds_check_mode_int = BoundsCheckMode.NONE.value

    def __exit__(self, *exc: Any) -> None:
        self.served.clamp_ids = False
        for tbe, mode in self.tables:
            tbe.bounds_check_mode_int = mode


def exported_program(served: ServingModule, config: ModelConfig) -> torch.export.ExportedProgram:
    """``torch.export`` of ``served``, batch size and id count dynamic, with the id check
    of :class:`_ExportableIds`."""
    device = next(served.parameters()).device
    batch = example_batch(config, 64, device)
    kjt = batch.sparse_features
    rows, ids = torch.export.Dim("batch", min=1, max=2**24), torch.export.Dim("ids", min=0, max=2**40)
    dims = ({0: rows}, {0: ids}, {0: len(served.features) * rows})
    with _ExportableIds(served), torch.no_grad():
        return torch.export.export(served, (batch.dense_features, kjt.values(), kjt.lengths().int()),
                                   dynamic_shapes=dims, strict=False)


def aoti_package(served: ServingModule, config: ModelConfig, path: Path, metadata: dict[str, Any]) -> None:
    """:func:`exported_program` of ``served``, compiled by AOTInductor into the package
    ``path``, its weights in one blob beside the code and ``metadata`` in the package's
    metadata."""
    program = exported_program(served, config)
    package = path.with_name(path.name + ".pt2")  # AOTInductor wants the suffix
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(package), inductor_configs={
            "aot_inductor.metadata": {METADATA: json.dumps(metadata, indent=1)},
            "aot_inductor.package_constants_in_so": False,
            "aot_inductor.package_constants_on_disk_format": "binary_blob",
        })
        package.replace(path)
    finally:
        package.unlink(missing_ok=True)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``afmrec.json`` metadata of an artifact (either format), without loading its
    weights."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith(f"extra/{METADATA}"):  # TorchScript's extra files
                    return json.loads(z.read(name))
                if name.endswith("wrapper_metadata.json"):  # AOTInductor's package metadata
                    found = json.loads(z.read(name)).get(METADATA)
                    if found is not None:
                        return json.loads(found)
            raise InputError(f"{path}: not an afmrec serving artifact (no {METADATA})")
    except (zipfile.BadZipFile, FileNotFoundError, IsADirectoryError) as e:
        raise InputError(f"{path}: not a TorchScript file or AOTInductor package ({e})") from None


def share_libstdcxx() -> None:
    """Puts the process's libstdc++ in the global symbol scope (``dlopen`` with
    ``RTLD_NOLOAD | RTLD_GLOBAL``; the same as ``LD_PRELOAD=libstdc++.so.6``), as a process
    must before it loads a CUDA AOTInductor package on some hosts.

    Why: the package's model library defines its own copies of some libstdc++ functions
    (``std::locale``'s) but binds their GNU-unique data (the locale facets' ids) to the
    process's libstdc++, which Python loaded with torch in a local scope. ``std::regex``,
    which the library's set-up uses to parse the device name, then looks a facet up in one
    copy's locale by the other copy's id and calls the wrong facet: SIGSEGV in
    ``AOTIModelPackageLoader``'s constructor (seen on the benchmark host: torch
    2.11 + CUDA 13, g++ 13, every CUDA package, a two-layer MLP's too). With libstdc++
    global, the library's calls bind to the process's copy, as its data already do. Does
    nothing off Linux or where no libstdc++ is loaded."""
    import ctypes
    import os
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
        except OSError:  # not loaded: nothing to share
            pass


def check_artifact(path: str | Path) -> None:
    """Verifies the CRC-32 of every record of the artifact's zip archive (either format):
    torch writes them, and its loaders do not check them (a changed byte in a weight
    loads as a wrong weight).

    Raises:
        InputError: a record's content differs from its CRC-32, or a compressed record
            cannot be inflated, naming it.
    """
    import zipfile
    import zlib

    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                try:
                    with z.open(info) as f:
                        while f.read(1 << 24):
                            pass
                except zipfile.BadZipFile:
                    raise InputError(f"{path}: damaged (its record {info.filename} fails its CRC-32)") from None
                except (zlib.error, EOFError):
                    raise InputError(f"{path}: damaged (its record {info.filename} cannot be "
                                     "decompressed)") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"{path}: not a TorchScript file or AOTInductor package ({e})") from None


def load_artifact(path: str | Path, device: torch.device | str = "cpu") -> tuple[Any, dict]:
    """Loads an artifact the way a server would (``torch.jit.load``, or
    ``torch._inductor.aoti_load_package`` for the aoti format, which serves on the device
    it was compiled for), after :func:`check_artifact`; returns it and its metadata."""
    import torchrec  # noqa: F401  (registers the FBGEMM operators the file calls)

    check_artifact(path)
    metadata = read_metadata(path)
    if metadata.get("artifact") == "aoti":
        share_libstdcxx()
        with open(path, "rb") as f:  # a file object: the name need not end in .pt2
            return torch._inductor.aoti_load_package(f), metadata
    module = torch.jit.load(str(path), map_location=torch.device(device))
    return module.eval(), metadata

