"""The per-run report: one row per model variant (size, quality, speed), as Parquet.

A row is a dict with at least :data:`REPORT_COLUMNS`; any further keys (``ratio``,
``delta_auc``, ``rank``...) become extra columns, after the required ones, in the order
they first appear. The evaluation stage adds ``samples_per_s`` (over all ranks),
``peak_memory_gib`` (the largest GPU peak of any rank) and ``throughput`` (the per-rank
record, JSON text: :meth:`afmrec.pipeline.runinfo.RunInfo.to_dict`).
:func:`format_report` renders the rows as an aligned text table for the terminal.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .artifacts import REPORT, atomic_file, run_record, versions
from .errors import InputError

REPORT_COLUMNS = ("variant", "params", "bytes", "auc", "logloss", "latency_ms")

# Fixed types for the required columns, so that reports from different runs concatenate.
_REQUIRED_TYPES: dict[str, pa.DataType] = {
    "variant": pa.string(),
    "params": pa.int64(),
    "bytes": pa.int64(),
    "auc": pa.float64(),
    "logloss": pa.float64(),
    "latency_ms": pa.float64(),
}
# Fixed types for optional columns that may be all null in one run (CPU: no GPU peak).
_OPTIONAL_TYPES: dict[str, pa.DataType] = {
    "samples_per_s": pa.float64(),
    "peak_memory_gib": pa.float64(),
    "throughput": pa.string(),
}


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Required columns first, then extra keys in order of first appearance."""
    extras = dict.fromkeys(k for row in rows for k in row if k not in _REQUIRED_TYPES)
    return [*REPORT_COLUMNS, *extras]


def _check_rows(rows: Sequence[Mapping[str, Any]], where: str) -> None:
    for i, row in enumerate(rows):
        missing = [c for c in REPORT_COLUMNS if c not in row]
        if missing:
            name = row.get("variant", f"#{i}")
            raise InputError(f"{where}: report row {name!r} lacks column(s) {missing}")


def _to_table(rows: Sequence[Mapping[str, Any]], where: str,
              settings: Mapping[str, Any] | None = None) -> pa.Table:
    _check_rows(rows, where)
    arrays = {}
    for column in _columns(rows):
        values = [row.get(column) for row in rows]
        try:
            kind = _REQUIRED_TYPES.get(column, _OPTIONAL_TYPES.get(column))
            arrays[column] = pa.array(values, type=kind)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise InputError(f"{where}: report column {column!r} has bad values ({e})") from None
    table = pa.table(arrays)
    return table.replace_schema_metadata({"afmrec.versions": json.dumps(versions()),
                                          "afmrec.run": json.dumps(run_record()),
                                          "afmrec.settings": json.dumps(settings or {}, default=str)})


def write_report(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *, overwrite: bool = True,
    settings: Mapping[str, Any] | None = None,
) -> None:
    """Writes the rows as a Parquet table, atomically.

    Args:
        rows: one dict per variant, each with every column of :data:`REPORT_COLUMNS`
            (values may be ``None`` where not measured); extra keys become extra columns
            (null where a row lacks them).
        path: the Parquet file to write.
        overwrite: replace an existing report (a report is an output, re-run freely;
            never a file of another kind).
        settings: how the rows were made (stored in the file's metadata beside the
            versions, git commit and device of :func:`~afmrec.pipeline.artifacts.run_record`).
    Raises:
        InputError: a row lacks a required column, a column's values have mixed or wrong
            types, or ``path`` exists and ``overwrite`` is false.

    Example::

        write_report([{"variant": "original", "params": 1000, "bytes": 4000, "auc": 0.8,
                       "logloss": 0.45, "latency_ms": 1.2}], "run/report.parquet")
    """
    table = _to_table(rows, str(path), settings)
    with atomic_file(path, overwrite=overwrite, kind=REPORT) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)  # read_report verifies them


def read_report(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads a report written by :func:`write_report`, one dict per row.

    Raises:
        InputError: the file is missing, not Parquet, or lacks a required column.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: report not found")
    try:
        rows = pq.read_table(path, page_checksum_verification=True).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: not a Parquet report ({e})") from None
    _check_rows(rows, str(path))
    return rows


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _bytes(value: Any) -> str:
    size, unit = float(value), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, larger
    return f"{int(value)} B" if unit == "B" else f"{size:.2f} {unit}"


def _generic(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


# column -> formatter of one non-missing value; other columns use _generic.
_FORMATS: dict[str, Callable[[Any], str]] = {
    "variant": str,
    "params": lambda v: f"{int(v):,}",
    "ratio": lambda v: f"{v:.2f}x",
    "bytes": _bytes,
    "bytes_ratio": lambda v: f"{v:.2f}x",
    "auc": lambda v: f"{v:.4f}",
    "logloss": lambda v: f"{v:.4f}",
    "latency_ms": lambda v: f"{v:.2f}",
    "samples_per_s": lambda v: f"{v:,.0f}",
    "peak_memory_gib": lambda v: f"{v:.2f}",
}


def _format_cell(column: str, value: Any) -> str:
    if _is_missing(value):
        return "-"
    if column.startswith("delta_") and isinstance(value, float):
        return f"{value:+.4f}"  # the sign is the point of a delta
    return _FORMATS.get(column, _generic)(value)


def _with_ratio(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Adds ``ratio`` = first row's params / this row's params, unless rows carry one."""
    if any("ratio" in row for row in rows):
        return [dict(row) for row in rows]
    base = rows[0]["params"]
    return [
        {**row, "ratio": base / row["params"] if base and row["params"] else None} for row in rows
    ]


def format_report(
    rows: Sequence[Mapping[str, Any]], *, hide: Sequence[str] = ("model_dir", "throughput")
) -> str:
    """An aligned text table of the rows, for printing.

    Columns: variant, params (thousands separators), ratio (the first row's params over
    each row's, ``4.12x``; taken from the rows when they carry a ``ratio``), bytes (binary
    units; then ``table_format`` and ``bytes_ratio``, ``4.03x``, where the rows have them), AUC and logloss (4 decimals), latency in ms (2 decimals), then the extra
    columns (``delta_*`` signed; ``samples_per_s`` without decimals, ``peak_memory_gib``
    with 2). Missing values print as ``-``. Text is left-aligned,
    numbers right-aligned.

    Raises:
        InputError: a row lacks a required column.

    Args:
        rows: the report rows.
        hide: columns not printed (paths and per-rank records are long and are in the
            Parquet file).

    Example::

        print(format_report(read_report("run/report.parquet")))
    """
    _check_rows(rows, "format_report")
    if not rows:
        return "(empty report)"
    rows = _with_ratio(rows)
    columns = [c for c in _columns(rows) if c not in hide]
    columns.insert(2, columns.pop(columns.index("ratio")))  # next to params
    for name in ("bytes_ratio", "table_format"):  # next to bytes, when the rows have them
        if name in columns:
            columns.insert(columns.index("bytes") + 1, columns.pop(columns.index(name)))
    cells = [[_format_cell(c, row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [not _is_text(rows, c) for c in columns]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(columns), rule, *(line(r) for r in cells)])


def _is_text(rows: Sequence[Mapping[str, Any]], column: str) -> bool:
    return any(isinstance(row.get(column), str) for row in rows)
