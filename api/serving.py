"""``export``: the serving artifact of a model, compressed or not (``afmrec export``'s
machinery, :func:`afmrec.pipeline.export.export_model`, for a model in memory)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from afmrec.models import DeepFM, LowRankEmbeddingBagCollection
from afmrec.pipeline.errors import InputError
from afmrec.pipeline.evaluate import eval_mode
from afmrec.pipeline.export import ExportConfig, export_model

from .core import PLAN_ATTRIBUTE


@dataclass(frozen=True)
class _Feature:
    """One sparse input of the artifact: a feature and the rows of the table it reads."""

    name: str
    num_embeddings: int


@dataclass(frozen=True)
class ServingSchema:
    """What :func:`~afmrec.pipeline.export.export_model` reads of a model's config: the
    sparse features in input order (``tables``, each with its table's rows), the dense
    width, their names and the architecture's name (recorded in the artifact)."""

    arch: str
    tables: tuple[_Feature, ...]
    num_dense: int
    dense_names: tuple[str, ...] | None = None


def _arch(model: nn.Module) -> str:
    if isinstance(model, DLRM_DCN):
        return "dcn"
    if isinstance(model, DLRM):
        return "dlrm"
    if isinstance(model, DeepFM):
        return "deepfm"
    return type(model).__name__


def _features(model: nn.Module) -> tuple[_Feature, ...]:
    """Every feature of the model's collections, in their order (a feature several
    collections read: the fewest rows)."""
    rows: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, (EmbeddingBagCollection, LowRankEmbeddingBagCollection)):
            for c in m.embedding_bag_configs():
                for f in c.feature_names:
                    rows[f] = min(rows.get(f, c.num_embeddings), c.num_embeddings)
    return tuple(_Feature(f, n) for f, n in rows.items())


def _num_dense(model: nn.Module) -> int | None:
    """The dense width N of a model ``afmrec.models`` builds (None for other models)."""
    if not isinstance(model, (DLRM, DeepFM)):
        return None
    if getattr(model, "dense_arch", None) is None:  # DeepFM without dense features
        return 0
    return next(m.in_features for m in model.dense_arch.modules() if hasattr(m, "in_features"))


def export(
    model: nn.Module,
    path: str | Path,
    *,
    tables: str | None = None,
    format: str = "torchscript",
    num_dense: int | None = None,
    check_batch: int = 256,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes the serving artifact of ``model`` to ``path`` (as ``afmrec export`` does).

    The file loads without afmrec (``import torchrec`` registers FBGEMM's operators)::

        served = torch.jit.load(path)          # the aoti format: torch._inductor.aoti_load_package
        logits = served(dense, values, lengths)  # (B, N) float32, (L,) int64, (F * B,) int32 -> (B,)

    ``lengths`` holds, feature by feature in the order of the metadata's ``features``
    (:func:`afmrec.pipeline.export.read_metadata`), each row's bag size.

    Supported: models ``afmrec.models`` builds (compressed or not), and any module whose
    ``forward(dense (B, N), kjt)`` returns logits (B,) or (B, 1) and which TorchRec's fx
    tracer and TorchScript (or ``torch.export``) can compile. A module fed otherwise (the
    ``forward=`` of :func:`afmrec.compress_`) cannot be exported this way.

    Args:
        model: unsharded, on the device the artifact serves on (left unchanged).
        path: the file to write (``.pt`` for torchscript, ``.pt2`` for aoti).
        tables: row format of the tables, ``fp32``, ``fp16``, ``int8`` or ``int4``; default
            the format :func:`afmrec.compress_` planned in (``model.afmrec_plan``), else fp32.
        format: ``torchscript`` or ``aoti`` (``afmrec.pipeline.export``).
        num_dense: N, the dense width (inferred for models ``afmrec.models`` builds).
        check_batch: rows of a random batch on which the written file is loaded back and
            compared with ``model`` (0: no check); a mismatch writes nothing.
        overwrite: replace an existing file.

    Returns:
        The artifact's metadata (features, dense width, table format, ...).

    Raises:
        InputError: a bad argument, a model without tables, or one export cannot compile
            (one line saying why).
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"export: model must be an nn.Module, got {type(model).__name__}")
    if tables is None:
        tables = (getattr(model, PLAN_ATTRIBUTE, None) or {}).get("table_format", "fp32")
    config = ExportConfig(tables=tables, check_batch=check_batch, format=format)
    features = _features(model)
    if not features:
        raise InputError(f"export: {type(model).__name__} holds no EmbeddingBagCollection")
    n = num_dense if num_dense is not None else _num_dense(model)
    if n is None:
        raise InputError(f"export: cannot tell the dense width of a {type(model).__name__}: pass num_dense=N")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"export: num_dense must be an integer >= 0, got {n!r}")
    schema = ServingSchema(_arch(model), features, n)
    source = {"module": f"{type(model).__module__}.{type(model).__qualname__}",
              "plan": getattr(model, PLAN_ATTRIBUTE, None)}
    try:
        with eval_mode(model):
            return export_model(model, schema, Path(path), config, source=source, overwrite=overwrite)
    except InputError:
        raise
    except Exception as e:  # tracing, scripting or export failed: the model is not exportable
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise InputError(
            f"export: cannot compile {type(model).__name__} to {format} ({type(e).__name__}: {first}); "
            "export supports models afmrec.models builds and modules whose forward(dense, kjt) "
            "TorchRec's fx tracer and TorchScript can compile") from e
