"""The data layer: Parquet datasets with a declared schema, read as TorchRec batches.

* :mod:`.schema`: the on-disk layout, its validation and writing.
* :mod:`.reader`: :class:`ParquetBatches`, a rank's share of a dataset as ``Batch`` es.
* :mod:`.convert`: raw Criteo TSV and libFM text to the layout.
* :mod:`.movielens`: MovieLens-1M (ratings, users, movies) to train/val/test datasets.
* :mod:`.vocab`: per-field vocabularies (strings to table rows, with an OOV row).
* :mod:`.splits`: train/validation/test splits and the folder that holds them.
* :mod:`.textio`: reading raw text: line blocks, gzip, encodings.
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
from .movielens import convert_movielens
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
from .splits import SplitConfig
from .synth import CRITEO_KAGGLE_TABLE_SIZES, DEFAULT_TABLE_SIZES, SynthConfig, synthesize
from .vocab import VOCAB_FILE, VocabConfig, Vocabulary, load_vocabularies, save_vocabularies

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
    "SplitConfig",
    "SynthConfig",
    "VOCAB_FILE",
    "VocabConfig",
    "Vocabulary",
    "conform_table",
    "convert_criteo",
    "convert_libfm",
    "convert_movielens",
    "create_dataset",
    "criteo_schema",
    "describe_dataset",
    "list_parts",
    "load_vocabularies",
    "make_batch",
    "parse_fields",
    "read_info",
    "read_schema",
    "save_vocabularies",
    "sparse_column",
    "synthesize",
    "validate_table",
    "write_dataset",
]
