"""The data layer: Parquet datasets with a declared schema, read as TorchRec batches.

* :mod:`.schema`: the on-disk layout, its validation and writing.
* :mod:`.reader`: :class:`ParquetBatches`, a rank's share of a dataset as ``Batch`` es.
* :mod:`.convert`: raw Criteo TSV and libFM text to the layout.
* :mod:`.synth`: production-shaped synthetic data labelled by a hidden model.

Shapes: B = batch size, F = sparse fields, N = dense features.
"""

from .convert import (
    CRITEO_DENSE,
    CRITEO_SPARSE,
    DEFAULT_CRITEO_TABLE_SIZE,
    FRAPPE_FIELDS,
    convert_criteo,
    convert_libfm,
    criteo_schema,
    parse_fields,
)
from .reader import ParquetBatches, make_batch
from .schema import (
    SCHEMA_KEY,
    DatasetWriter,
    DataSchema,
    SparseField,
    conform_table,
    create_dataset,
    describe_dataset,
    list_parts,
    read_info,
    read_schema,
    sparse_column,
    validate_table,
    write_dataset,
)
from .synth import CRITEO_KAGGLE_TABLE_SIZES, DEFAULT_TABLE_SIZES, SynthConfig, synthesize

__all__ = [
    "CRITEO_DENSE",
    "CRITEO_KAGGLE_TABLE_SIZES",
    "CRITEO_SPARSE",
    "DEFAULT_CRITEO_TABLE_SIZE",
    "DEFAULT_TABLE_SIZES",
    "FRAPPE_FIELDS",
    "SCHEMA_KEY",
    "DataSchema",
    "DatasetWriter",
    "ParquetBatches",
    "SparseField",
    "SynthConfig",
    "conform_table",
    "convert_criteo",
    "convert_libfm",
    "create_dataset",
    "criteo_schema",
    "describe_dataset",
    "list_parts",
    "make_batch",
    "parse_fields",
    "read_info",
    "read_schema",
    "sparse_column",
    "synthesize",
    "validate_table",
    "write_dataset",
]
