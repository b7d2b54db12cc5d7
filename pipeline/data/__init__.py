"""The data layer: Parquet datasets with a declared schema, read as TorchRec batches.

* :mod:`.schema`: the on-disk layout, its validation and writing.
* :mod:`.reader`: :class:`ParquetBatches`, a rank's share of a dataset as ``Batch`` es.
* :mod:`.criteo`: raw Criteo TSV to the layout (hashed, or with vocabularies).
* :mod:`.libfm`: libFM / libSVM text to the layout.
* :mod:`.csvconvert`: delimited files (CSV, TSV) to train/val/test datasets.
* :mod:`.delimited`: reading delimited text in blocks with Arrow's CSV reader.
* :mod:`.encode`: the passes of a conversion with vocabularies (split, count, write).
* :mod:`.movielens`: MovieLens-1M (ratings, users, movies) to train/val/test datasets.
* :mod:`.vocab`: per-field vocabularies (strings to table rows, with an OOV row).
* :mod:`.splits`: train/validation/test splits and the folder that holds them.
* :mod:`.textio`: reading raw text: line blocks, gzip, encodings.
* :mod:`.synth`: production-shaped synthetic data labelled by a hidden model.

Shapes: B = batch size, F = sparse fields, N = dense features.
"""

from .criteo import (
    CRITEO_DENSE,
    CRITEO_SPARSE,
    DEFAULT_CRITEO_TABLE_SIZE,
    apply_criteo_vocab,
    convert_criteo,
    convert_criteo_vocab,
    criteo_schema,
)
from .csvconvert import CsvColumns, apply_csv_vocab, convert_csv
from .delimited import CsvFormat
from .libfm import FRAPPE_FIELDS, convert_libfm, parse_fields, read_feature_index
from .movielens import convert_movielens
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
from .vocab import (
    VOCAB_FILE,
    VocabConfig,
    Vocabulary,
    describe_vocabularies,
    load_vocabularies,
    save_vocabularies,
)

# The reader and synth import torch and torchrec (seconds): imported on first use, so that
# `afmrec convert` and other torch-free users of this package start fast.
_LAZY = {
    "ParquetBatches": "reader",
    "make_batch": "reader",
    "CRITEO_KAGGLE_TABLE_SIZES": "synth",
    "DEFAULT_TABLE_SIZES": "synth",
    "SynthConfig": "synth",
    "synthesize": "synth",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CRITEO_DENSE",
    "CRITEO_KAGGLE_TABLE_SIZES",
    "CRITEO_SPARSE",
    "CsvColumns",
    "CsvFormat",
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
    "apply_criteo_vocab",
    "apply_csv_vocab",
    "conform_table",
    "convert_criteo",
    "convert_criteo_vocab",
    "convert_csv",
    "convert_libfm",
    "convert_movielens",
    "create_dataset",
    "criteo_schema",
    "describe_dataset",
    "describe_vocabularies",
    "list_parts",
    "load_vocabularies",
    "make_batch",
    "parse_fields",
    "read_feature_index",
    "read_info",
    "read_schema",
    "save_vocabularies",
    "sparse_column",
    "synthesize",
    "validate_table",
    "write_dataset",
]
