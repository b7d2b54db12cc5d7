"""Bytes of a model as it is stored and served: the unit of a compression ratio.

A ratio counts bytes, not parameters: the original as its fp32 checkpoint holds it,
against the compressed model with its tables in the row format they will be served in.
Dense weights, projections and ``b2`` are fp32. A table row of width ``w`` takes

    fp32: 4 w     fp16: 2 w     int8: w + 4 (a float16 scale and bias per row)

bytes, padded to the row alignment of the kernels that serve it: FBGEMM's CUDA
inference kernels round every row up to 16 bytes, its CPU kernels take rows unpadded.
So on CUDA a rank-4 fp16 row (8 bytes) costs as much as a rank-4 fp32 row (16), and a
width-16 fp32 table (64 bytes a row) shrinks at most 4x in any format.

Example::

    fmt = TableFormat("int8", serve_device="cpu")
    fmt.row_bytes(8)   # 12
    TableFormat("int8", serve_device="cuda").row_bytes(8)  # 16
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:  # this module is imported by the CLI's argument parsers: no torch here
    from .blocks import Block

# The rank policies (afmrec.pipeline.ranks) and the formats a budget counts tables in.
POLICIES = ("loss", "variance", "uniform", "energy", "rank")
RATIO_POLICIES = ("loss", "variance", "uniform")
DTYPES = ("fp32", "fp16", "int8")
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
ROW_OVERHEAD = {"fp32": 0, "fp16": 0, "int8": 4}
SERVE_DEVICES = ("cuda", "cpu")
ROW_ALIGNMENT = {"cuda": 16, "cpu": 1}
TABLE_FORMATS = ("auto", *DTYPES)
DENSE_BYTES = 4  # every parameter outside the tables is fp32


@dataclass(frozen=True)
class TableFormat:
    """How the tables are served.

    Args:
        dtype: ``fp32``, ``fp16`` or ``int8`` (TorchRec's row-wise quantisation).
        serve_device: ``cuda`` (rows padded to 16 bytes) or ``cpu`` (unpadded).
    """

    dtype: str = "fp32"
    serve_device: str = "cuda"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InputError(f"table format must be one of {DTYPES}, got {self.dtype!r}")
        if self.serve_device not in SERVE_DEVICES:
            raise InputError(f"serve device must be one of {SERVE_DEVICES}, got {self.serve_device!r}")

    @property
    def alignment(self) -> int:
        return ROW_ALIGNMENT[self.serve_device]

    def row_bytes(self, width: int) -> int:
        """Bytes of one served row of ``width`` values, padding included."""
        raw = width * ELEMENT_BYTES[self.dtype] + ROW_OVERHEAD[self.dtype]
        return -(-raw // self.alignment) * self.alignment

    def __str__(self) -> str:
        return f"{self.dtype} tables served on {self.serve_device}"


def original_bytes(block: Block) -> int:
    """The block as the original's fp32 checkpoint stores it."""
    return DENSE_BYTES * block.params


def served_bytes(block: Block, rank: int | None, fmt: TableFormat) -> int:
    """The block served in ``fmt``: whole (``rank`` None) or as factors of ``rank``.

    A table's factors are its ``rank``-wide rows in ``fmt`` plus the fp32 projection and
    ``b2`` (``Block.compressed_params`` less the table); a Linear is fp32 either way.
    """
    if block.kind != "table":
        return DENSE_BYTES * (block.params if rank is None else block.compressed_params(rank))
    rows = block.in_features
    if rank is None:
        return rows * fmt.row_bytes(block.out_features)
    projection = block.compressed_params(rank) - rows * rank
    return rows * fmt.row_bytes(rank) + DENSE_BYTES * projection
