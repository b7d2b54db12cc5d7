"""``afmrec export``: the serving artifact of a (compressed) model.

The artifact is one TorchScript file, made the way TorchRec's inference stack makes its
models: the tables go through ``torchrec.inference.modules.quantize_embeddings`` (FBGEMM's
inference kernels, rows in fp32, fp16, int8 or int4), the model is traced with
``torchrec.fx.symbolic_trace`` and compiled with ``torch.jit.script``. The file holds the
code of every module it uses (our low-rank collection, DeepFM, the cross network), so it
loads with ``import torchrec`` (which registers FBGEMM's operators) and ``torch.jit.load``,
without ``afmrec`` installed.

Its forward takes plain tensors, so a server needs no TorchRec type to call it::

    import torch, torchrec  # torchrec (or fbgemm_gpu) registers the FBGEMM operators
    model = torch.jit.load("model.pt", map_location="cuda")
    logits = model(dense, values, lengths)  # (B, N) float, (L,) int64, (F * B,) int32 -> (B,)

``lengths`` holds, feature by feature in the order of ``features`` in the metadata, the
bag size of each of the B rows. The metadata (``afmrec.json`` inside the file,
:func:`read_metadata`) names the features, the dense width, the table dtype, the parameter
count and the model it came from.
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

from .artifacts import atomic_file, versions
from .errors import InputError
from .evaluate import count_parameters

FORMAT = "afmrec.serving/1"
METADATA = "afmrec.json"
TableDtype = Literal["fp32", "fp16", "int8", "int4"]
TABLE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "int8": torch.qint8,
    "int4": torch.quint4x2,
}


@dataclass(frozen=True)
class ExportConfig:
    """How the artifact is made.

    Args:
        tables: row format of every table (``int8``/``int4``: TorchRec's row-wise
            quantisation, a scale and bias per row).
        check_batch: rows of the batch on which the written file is loaded back and
            compared with the module it came from (0: no check).
    """

    tables: TableDtype = "fp32"
    check_batch: int = 256

    def __post_init__(self) -> None:
        if self.tables not in TABLE_DTYPES:
            raise InputError(f"tables must be one of {sorted(TABLE_DTYPES)}, got {self.tables!r}")
        if self.check_batch < 0:
            raise InputError(f"check_batch must be >= 0, got {self.check_batch}")


class ServingModule(nn.Module):
    """A CTR model behind a forward of plain tensors.

    Args:
        model: maps ``(dense (B, N), KJT)`` to logits (B, 1).
        features: the KJT's keys, in the order of ``lengths``.
        tables: the row format of its tables (recorded in the artifact).
        params: parameters of the float model it was made from (recorded).
    """

    def __init__(self, model: nn.Module, features: list[str], tables: str = "fp32", params: int = 0) -> None:
        super().__init__()
        self.model = model
        self.features = features
        self.tables = tables
        self.params = params

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Args: dense (B, N) float32; values (L,) int64 ids; lengths (F * B,) int32.
        Returns: logits (B,)."""
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=self.features, values=values, lengths=lengths)
        return self.model(dense, kjt).squeeze(-1)


def serving_module(model: nn.Module, features: list[str], tables: TableDtype = "fp32",
                   inplace: bool = False) -> ServingModule:
    """``model`` with its tables on FBGEMM's inference kernels, the projections of its
    low-rank tables as one batched GEMM where they all have one rank
    (``LowRankEmbeddingBagCollection.fuse_projections_``) and its serving form
    (``afmrec.models.serving``: DLRM-DCNv2 assembles its cross input in one buffer), in
    eval mode.

    Args:
        model: an unsharded model (``afmrec.models.build_model``, compressed or not).
        features: sparse feature names in input order.
        tables: row format of the tables.
        inplace: convert ``model`` itself instead of a copy (saves a copy of the tables
            on the device; ``model`` is then no longer a float model).
    """
    from torchrec.inference.modules import quantize_embeddings

    from afmrec.models import LowRankEmbeddingBagCollection
    from afmrec.models.serving import serving_form

    params = count_parameters(model)
    served = model if inplace else copy.deepcopy(model)
    for m in served.modules():
        if isinstance(m, LowRankEmbeddingBagCollection):
            m.fuse_projections_()
    served = quantize_embeddings(served, dtype=TABLE_DTYPES[tables], inplace=True)
    return ServingModule(serving_form(served), list(features), tables, params).eval()


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
    served = serving_module(model, [t.name for t in config.tables], export.tables)
    return write_artifact(served, config, out, check_batch=export.check_batch, source=source,
                          overwrite=overwrite)


def write_artifact(
    served: ServingModule,
    config: ModelConfig,
    out: str | Path,
    *,
    check_batch: int = 256,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Scripts a serving module and writes it to ``out`` (atomically), with its metadata.

    With ``check_batch`` rows, the written file is loaded back and its logits compared with
    ``served`` on an example batch; a mismatch beyond float rounding stops the export and
    writes nothing.
    """
    device = next(served.parameters()).device  # the dense part serves where the tables do
    metadata = {
        "format": FORMAT,
        "features": list(served.features),
        "num_dense": config.num_dense,
        "arch": config.arch,
        "tables": served.tables,
        "params": served.params,
        "device": str(device),
        "source": source or {},
        "versions": versions(),
        "forward": "logits (B,) = model(dense (B, num_dense) float32, values (L,) int64, "
                   "lengths (len(features) * B,) int32, feature-major)",
    }
    scripted = script(served)
    with atomic_file(out, overwrite=overwrite) as tmp:
        torch.jit.save(scripted, str(tmp), _extra_files={METADATA: json.dumps(metadata, indent=1)})
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


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``afmrec.json`` metadata of an artifact, without loading its weights."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith(f"extra/{METADATA}")), None)
            if name is None:
                raise InputError(f"{path}: not an afmrec serving artifact (no {METADATA})")
            return json.loads(z.read(name))
    except (zipfile.BadZipFile, FileNotFoundError, IsADirectoryError) as e:
        raise InputError(f"{path}: not a TorchScript file ({e})") from None


def load_artifact(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """Loads an artifact the way a server would (``torch.jit.load``); returns it and its metadata."""
    import torchrec  # noqa: F401  (registers the FBGEMM operators the file calls)

    files = {METADATA: ""}
    module = torch.jit.load(str(path), map_location=torch.device(device), _extra_files=files)
    return module.eval(), json.loads(files[METADATA])

