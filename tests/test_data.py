"""The data layer: converters, dataset writing and validation, the rank-split reader, synth.

Every dataset is written by the test into ``tmp_path``; expected values are computed by
hand (or by the documented formula) from the literal inputs.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from afmrec.launch.cli import main
from afmrec.pipeline.artifacts import file_fingerprint
from afmrec.pipeline.data import (
    FRAPPE_FIELDS,
    SCHEMA_KEY,
    DataSchema,
    ParquetBatches,
    SparseField,
    SynthConfig,
    convert_criteo,
    convert_libfm,
    make_batch,
    parse_fields,
    read_info,
    read_schema,
    synthesize,
    validate_table,
    write_dataset,
)
from afmrec.pipeline.errors import InputError

FRAPPE_TEST = Path(__file__).resolve().parents[2] / "shared/data/frappe/frappe.test.libfm"

# --- a small dataset for the reader: row i is identified by its id in field "row" ---------

NUM_ROWS = 23
SCHEMA = DataSchema(
    dense=("d",),
    sparse=(SparseField("row", 100), SparseField("bag", 10, multi_hot=True)),
)


def bag_of(i: int) -> list[int]:
    return [i % 10] * (i % 3)  # sizes 0, 1, 2: empty bags included


def small_table(n: int = NUM_ROWS) -> pa.Table:
    return pa.table(
        {
            "label": pa.array([int(i % 3 == 0) for i in range(n)], pa.int8()),
            "d": pa.array([float(i) for i in range(n)], pa.float32()),
            "row": pa.array(range(n), pa.int64()),
            "bag": pa.array([bag_of(i) for i in range(n)], pa.list_(pa.int64())),
        }
    )


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    # parts of 10, 10 and 3 rows; row groups of 4, 4, 2 | 4, 4, 2 | 3
    return write_dataset(
        small_table(), SCHEMA, tmp_path / "ds", rows_per_file=10, row_group_size=4
    )


def decode(batches) -> list[tuple]:
    """(row id, label, dense, bag) of every row of ``batches``, from the tensors."""
    out = []
    for batch in batches:
        fields = batch.sparse_features.to_dict()
        ids = fields["row"].values().tolist()
        bags = [b.tolist() for b in fields["bag"].to_dense()]
        for k, i in enumerate(ids):
            out.append((i, batch.labels[k].item(), batch.dense_features[k].tolist(), bags[k]))
    return out


def expected_rows(ids) -> list[tuple]:
    return [(i, float(i % 3 == 0), [float(i)], bag_of(i)) for i in ids]


# --- schema and writing ------------------------------------------------------------------


def test_schema_round_trip_and_arrow_types():
    assert DataSchema.from_dict(json.loads(json.dumps(SCHEMA.to_dict()))) == SCHEMA
    assert SCHEMA.table_sizes() == {"row": 100, "bag": 10}
    arrow = SCHEMA.arrow_schema()
    assert arrow.names == ["label", "d", "row", "bag"]
    assert arrow.types == [pa.int8(), pa.float32(), pa.int64(), pa.list_(pa.int64())]
    assert DataSchema.from_dict(json.loads(arrow.metadata[SCHEMA_KEY])) == SCHEMA


@pytest.mark.reliability
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DataSchema(("a",), (SparseField("a", 3),)), "duplicate column names"),
        (lambda: DataSchema(("a",), ()), "at least one sparse field"),
        (lambda: SparseField("s", 0), "'s': num_embeddings"),
        (lambda: DataSchema.from_dict({"dense": []}), "malformed dataset schema"),
    ],
)
def test_schema_validation(make, message):
    with pytest.raises(InputError, match=message):
        make()


def test_write_dataset_parts_row_groups_and_info(small_dataset: Path):
    parts = sorted(p.name for p in small_dataset.glob("*.parquet"))
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    groups = [
        [pq.ParquetFile(small_dataset / p).metadata.row_group(g).num_rows for g in range(n)]
        for p, n in ((p, pq.ParquetFile(small_dataset / p).num_row_groups) for p in parts)
    ]
    assert groups == [[4, 4, 2], [4, 4, 2], [3]]
    assert read_schema(small_dataset) == SCHEMA
    info = read_info(small_dataset)
    assert (info["num_rows"], info["num_positives"]) == (23, 8)
    assert info["positive_rate"] == 8 / 23
    assert pa.concat_tables(pq.read_table(small_dataset / p) for p in parts).to_pydict() == (
        small_table().to_pydict()
    )


@pytest.mark.reliability
def test_write_dataset_refuses_to_overwrite(small_dataset: Path):
    with pytest.raises(InputError, match="already exists"):
        write_dataset(small_table(5), SCHEMA, small_dataset)
    write_dataset(small_table(5), SCHEMA, small_dataset, overwrite=True)
    assert read_info(small_dataset)["num_rows"] == 5


def _replace(table: pa.Table, name: str, values, dtype=None) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, dtype))


@pytest.mark.reliability
@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda t: t.drop_columns(["row"]), r"missing column\(s\) \['row'\]"),
        (lambda t: t.append_column("extra", pa.array([0] * 5)), r"\['extra'\] are not in"),
        (lambda t: _replace(t, "row", list("abcde")), "column 'row' has type string"),
        (lambda t: _replace(t, "bag", [0, 1, 2, 3, 4]), "column 'bag' has type int64"),
        (lambda t: _replace(t, "row", [0, 1, 100, 3, 4]), "column 'row' has id 100 >= its"),
        (lambda t: _replace(t, "row", [0, -1, 2, 3, 4]), "column 'row' has a negative id -1"),
        (lambda t: _replace(t, "bag", [[], [10], [], [], []]), "column 'bag' has id 10"),
        (lambda t: _replace(t, "label", [0, None, 1, 0, 0]), "column 'label' has 1 null"),
        (lambda t: _replace(t, "label", [0, 2, 1, 0, 0]), "column 'label' must hold 0 or 1"),
        (lambda t: _replace(t, "label", [0.0, 0.5, 1, 0, 0]), "must hold 0 or 1, found 0.5"),
        (lambda t: _replace(t, "d", [0.0, math.nan, 1, 0, 0]), "column 'd' has NaN"),
    ],
)
def test_validate_table_errors_name_source_and_column(corrupt, message):
    with pytest.raises(InputError, match=message) as error:
        validate_table(corrupt(small_table(5)), SCHEMA, "src.parquet")
    assert str(error.value).startswith("src.parquet: ")


def test_validate_table_accepts_lossless_types(tmp_path: Path):
    table = small_table(5)
    table = _replace(table, "label", [True, False, False, True, False])
    table = _replace(table, "row", range(5), pa.int16())
    write_dataset(table, SCHEMA, tmp_path / "ds")
    stored = pq.read_table(tmp_path / "ds" / "part-00000.parquet")
    assert stored.schema.equals(SCHEMA.arrow_schema())
    assert stored.column("label").to_pylist() == [1, 0, 0, 1, 0]


@pytest.mark.reliability
def test_empty_or_foreign_datasets_are_input_errors(tmp_path: Path):
    with pytest.raises(InputError, match="dataset not found"):
        read_schema(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .parquet files"):
        ParquetBatches(tmp_path / "empty", 4)
    (tmp_path / "foreign").mkdir()
    pq.write_table(small_table(3), tmp_path / "foreign" / "a.parquet")
    with pytest.raises(InputError, match="a.parquet: no afmrec.schema metadata"):
        read_schema(tmp_path / "foreign")
    with pytest.raises(InputError, match="no rows to write"):
        write_dataset(small_table(0), SCHEMA, tmp_path / "zero")
    assert not (tmp_path / "zero").exists()


@pytest.mark.reliability
def test_reader_validates_every_row_group(tmp_path: Path):
    (tmp_path / "bad").mkdir()
    table = _replace(small_table(6), "row", [0, 1, 2, 3, 4, 200])
    pq.write_table(table.cast(SCHEMA.arrow_schema()), tmp_path / "bad" / "p.parquet")
    batches = ParquetBatches(tmp_path / "bad", 2)
    with pytest.raises(InputError, match=r"p.parquet \(row group 0\): column 'row' has id 200"):
        list(batches)


# --- reader ------------------------------------------------------------------------------


def test_make_batch_matches_table_and_from_lengths_sync():
    batch = make_batch(small_table(5), SCHEMA)
    assert batch.dense_features.dtype == torch.float32 and batch.dense_features.shape == (5, 1)
    assert batch.labels.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    kjt = batch.sparse_features
    assert kjt.keys() == ["row", "bag"]
    # key-major: the 5 rows of "row", then the 5 bags [], [1], [2, 2], [], [4]
    assert kjt.lengths().tolist() == [1, 1, 1, 1, 1, 0, 1, 2, 0, 1]
    assert kjt.values().tolist() == [0, 1, 2, 3, 4, 1, 2, 2, 4]
    assert kjt.lengths().dtype == torch.int32 and kjt.values().dtype == torch.int64
    reference = KeyedJaggedTensor.from_lengths_sync(kjt.keys(), kjt.values(), kjt.lengths())
    assert kjt.length_per_key() == reference.length_per_key() == [5, 4]
    assert kjt.offset_per_key() == reference.offset_per_key() == [0, 5, 9]
    assert torch.equal(kjt.offsets(), reference.offsets())


def test_reader_in_order_covers_each_row_once(small_dataset: Path):
    batches = ParquetBatches(small_dataset, 5)
    assert (len(batches), batches.num_rows) == (5, 23)
    assert [b.labels.shape[0] for b in batches] == [5, 5, 5, 5, 3]
    assert decode(batches) == expected_rows(range(23))


def test_reader_ranks_split_rows_contiguously(small_dataset: Path):
    ranks = [ParquetBatches(small_dataset, 3, rank=r, world_size=2) for r in (0, 1)]
    assert [r.num_rows for r in ranks] == [11, 12]
    assert [len(r) for r in ranks] == [4, 4]  # 3+3+3+2 and 3+3+3+3
    assert decode(ranks[0]) == expected_rows(range(0, 11))
    assert decode(ranks[1]) == expected_rows(range(11, 23))


def test_reader_ranks_get_as_many_batches_and_every_row(small_dataset: Path):
    """11 and 12 rows in batches of 5: both ranks make 3 batches (a sharded forward is
    collective), the last one taking the rest: 5+5+1 and 5+5+2."""
    ranks = [ParquetBatches(small_dataset, 5, rank=r, world_size=2) for r in (0, 1)]
    assert [[b.labels.shape[0] for b in r] for r in ranks] == [[5, 5, 1], [5, 5, 2]]
    assert decode(ranks[0]) + decode(ranks[1]) == expected_rows(range(23))
    sizes = [b.labels.shape[0] for b in ParquetBatches(small_dataset, 4, rank=1, world_size=2)]
    assert sizes == [4, 4, 4]  # 11 // 2 rows per rank -> 3 batches; rank 1's last takes 4


def test_reader_drop_last_gives_every_rank_as_many_batches(small_dataset: Path):
    ranks = [
        ParquetBatches(small_dataset, 3, rank=r, world_size=2, drop_last=True) for r in (0, 1)
    ]
    # 11 // 3 = 3 full batches each, although rank 1 alone holds 12 rows (4 batches)
    assert [len(r) for r in ranks] == [3, 3]
    assert [len(list(r)) for r in ranks] == [3, 3]
    assert decode(ranks[0]) == expected_rows(range(0, 9))
    assert decode(ranks[1]) == expected_rows(range(11, 20))


def test_reader_row_range_and_limit_rows(small_dataset: Path):
    head = ParquetBatches(small_dataset, 4, row_range=(0.0, 0.5))
    tail = ParquetBatches(small_dataset, 4, row_range=(0.5, 1.0))
    assert decode(head) == expected_rows(range(0, 11))  # int(0.5 * 23) = 11
    assert decode(tail) == expected_rows(range(11, 23))
    limited = ParquetBatches(small_dataset, 4, row_range=(0.5, 1.0), limit_rows=5)
    assert decode(limited) == expected_rows(range(11, 16))


def test_shuffle_is_a_deterministic_permutation_per_seed_and_epoch(small_dataset: Path):
    def order(seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
        batches = ParquetBatches(
            small_dataset, 4, shuffle=True, seed=seed, rank=rank, world_size=world_size
        )
        batches.set_epoch(epoch)
        rows = decode(batches)
        assert rows == expected_rows(r[0] for r in rows)  # rows stay whole
        return [r[0] for r in rows]

    first = order(seed=1, epoch=0)
    assert sorted(first) == list(range(23)) and first != list(range(23))
    assert order(seed=1, epoch=0) == first
    assert order(seed=1, epoch=1) != first
    assert order(seed=2, epoch=0) != first
    halves = [order(seed=1, epoch=0, rank=r, world_size=2) for r in (0, 1)]
    assert sorted(halves[0]) == list(range(11)) and sorted(halves[1]) == list(range(11, 23))


# --- Criteo ------------------------------------------------------------------------------


def criteo_line(label: str, dense: dict[int, str], sparse: dict[int, str]) -> str:
    """A TSV line; dense/sparse map 1-based feature numbers to values, others are empty."""
    dense_fields = [dense.get(i, "") for i in range(1, 14)]
    sparse_fields = [sparse.get(i, "") for i in range(1, 27)]
    return "\t".join([label, *dense_fields, *sparse_fields])


CRITEO_LINES = [
    criteo_line("1", {1: "5", 2: "-3", 13: "1000"}, {1: "68fd1e64", 2: "80e26c9b", 26: "FF"}),
    criteo_line("0", {}, {1: "0", 3: "hello", 4: "NA"}),
    criteo_line("0", {3: "7"}, dict.fromkeys(range(1, 27), "0000000a")),
]


def write_text(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return path


def test_criteo_round_trip(tmp_path: Path):
    source = write_text(tmp_path / "day.tsv", CRITEO_LINES)
    sizes = {f"C{i}": 1000 for i in range(1, 27)} | {"C1": 7}
    out = convert_criteo([source], tmp_path / "criteo", table_size=sizes)
    schema = read_schema(out)
    assert schema.table_sizes() == sizes and all(f.multi_hot for f in schema.sparse)
    (batch,) = ParquetBatches(out, 3)
    assert batch.labels.tolist() == [1.0, 0.0, 0.0]

    dense = batch.dense_features
    assert dense.shape == (3, 13)
    assert dense[0].tolist() == pytest.approx(
        [math.log(6), 0.0, *[0.0] * 10, math.log(1001)], rel=1e-7
    )  # log(1 + 5), log(1 + max(-3, 0)), empty -> 0 ... log(1 + 1000)
    assert dense[1].tolist() == [0.0] * 13
    assert dense[2, 2].item() == pytest.approx(math.log(8), rel=1e-7)

    fields = batch.sparse_features.to_dict()
    def blake(s: bytes) -> int:  # the hash of values that are not hex
        return int.from_bytes(hashlib.blake2b(s, digest_size=8).digest(), "little")

    assert fields["C1"].to_dense()[0].tolist() == [0x68FD1E64 % 7]
    assert fields["C1"].values().tolist() == [0x68FD1E64 % 7, 0, 10 % 7]
    assert fields["C2"].lengths().tolist() == [1, 0, 1]
    assert fields["C2"].values().tolist() == [0x80E26C9B % 1000, 10]
    assert fields["C3"].values().tolist() == [blake(b"hello") % 1000, 10]
    assert fields["C4"].values().tolist() == [blake(b"NA") % 1000, 10]  # a value, not missing
    assert fields["C5"].lengths().tolist() == [0, 0, 1]
    assert fields["C26"].values().tolist() == [255, 10]


def test_criteo_gzip_blocks_and_max_rows(tmp_path: Path):
    plain = convert_criteo([write_text(tmp_path / "a.tsv", CRITEO_LINES)], tmp_path / "plain")
    gz = tmp_path / "a.tsv.gz"
    gz.write_bytes(gzip.compress("\n".join(CRITEO_LINES).encode()))  # no final newline
    # 50-byte blocks are shorter than a line: lines must still be reassembled whole
    blocks = convert_criteo([gz], tmp_path / "gz", block_bytes=50)
    read = lambda path: pq.read_table(path / "part-00000.parquet")  # noqa: E731
    assert read(blocks).equals(read(plain))
    two = convert_criteo([gz, gz], tmp_path / "two", max_rows=4, block_bytes=50)
    assert read(two).slice(0, 3).equals(read(plain)) and read_info(two)["num_rows"] == 4


@pytest.mark.reliability
@pytest.mark.parametrize("block_bytes", [1 << 20, 64])
@pytest.mark.parametrize(
    "line, message",
    [
        ("1\t2\t3", "expected 40 tab-separated fields, got 3"),
        ("", "expected 40 tab-separated fields, got 1"),
        (criteo_line("1", {2: "1.5"}, {}), "I2 must be an integer, got '1.5'"),
        (criteo_line("2", {}, {}), "label must be 0 or 1, got '2'"),
        (criteo_line("", {}, {}), "label must be 0 or 1, got None"),
    ],
)
def test_criteo_malformed_line_names_file_and_line(tmp_path: Path, block_bytes, line, message):
    source = write_text(tmp_path / "day.tsv", [*CRITEO_LINES, line, CRITEO_LINES[0]])
    with pytest.raises(InputError, match=message) as error:
        convert_criteo([source], tmp_path / "out", block_bytes=block_bytes)
    assert str(error.value).startswith(f"{source}:4: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.reliability
def test_converters_refuse_to_write_over_their_inputs(tmp_path: Path):
    source = write_text(tmp_path / "day.tsv", CRITEO_LINES)
    with pytest.raises(InputError, match="would contain the input"):
        convert_criteo([source], tmp_path)
    with pytest.raises(InputError, match="input file not found"):
        convert_criteo([tmp_path / "absent.tsv"], tmp_path / "out")


# --- libFM -------------------------------------------------------------------------------

LIBFM_FIELDS = [("a", 0, 2), ("b", 3, 5), ("c", 6, 6)]
LIBFM_LINES = [
    "1 0:1 4:1 6:1",
    "-1 2:1 3:1 5:1 6:1",  # two ids in b
    "1 1:1 6:1",  # none in b
    "0 6:1 0:1.0 3:1",  # any token order, value 1.0
]


def test_libfm_round_trip_with_crlf(tmp_path: Path):
    source = write_text(tmp_path / "x.libfm", LIBFM_LINES, newline="\r\n")
    out = convert_libfm([source], tmp_path / "out", fields=LIBFM_FIELDS)
    assert read_schema(out) == DataSchema(
        dense=(),
        sparse=(SparseField("a", 3), SparseField("b", 3, multi_hot=True), SparseField("c", 1)),
    )
    table = pq.read_table(out / "part-00000.parquet")
    assert table.to_pydict() == {
        "label": [1, 0, 1, 0],
        "a": [0, 2, 1, 0],
        "b": [[1], [0, 2], [], [0]],
        "c": [0, 0, 0, 0],
    }
    (batch,) = ParquetBatches(out, 4)
    assert batch.dense_features.shape == (4, 0)
    assert batch.sparse_features["b"].lengths().tolist() == [1, 2, 0, 1]


def test_parse_fields():
    assert parse_fields("user:0-9, item:10-19") == [("user", 0, 9), ("item", 10, 19)]
    with pytest.raises(InputError, match="'user:9' of"):
        parse_fields("user:9")


@pytest.mark.reliability
@pytest.mark.parametrize(
    "line, message",
    [
        ("1 0:1 7:1", "feature id 7 is in no declared field's id range"),
        ("1 0:2", "feature '0:2': only binary features"),
        ("2 0:1", "label must be -1, 0 or 1, got '2'"),
        ("1 0", "feature '0': not id:value"),
        ("1 x:1", "feature 'x:1': id not an integer"),
        ("1 0:y", "feature '0:y': value not a number"),
        ("", "empty line"),
    ],
)
def test_libfm_malformed_line_names_file_and_line(tmp_path: Path, line, message):
    source = write_text(tmp_path / "x.libfm", [*LIBFM_LINES[:2], line, LIBFM_LINES[0]])
    with pytest.raises(InputError, match=message) as error:
        convert_libfm([source], tmp_path / "out", fields=LIBFM_FIELDS)
    assert str(error.value).startswith(f"{source}:3: ")


@pytest.mark.reliability
def test_libfm_overlapping_fields_are_rejected(tmp_path: Path):
    source = write_text(tmp_path / "x.libfm", LIBFM_LINES)
    with pytest.raises(InputError, match="'a' and 'b' have overlapping id ranges"):
        convert_libfm([source], tmp_path / "out", fields=[("a", 0, 3), ("b", 3, 6)])


@pytest.mark.skipif(not FRAPPE_TEST.is_file(), reason="Frappe is not in ../shared/data")
def test_frappe_preset_on_real_data(tmp_path: Path):
    with open(FRAPPE_TEST, "rb") as f:
        head = b"".join(f.readline() for _ in range(2000))
    sample = tmp_path / "frappe_head.libfm"  # a temporary file, never in the repository
    sample.write_bytes(head)
    out = convert_libfm([sample], tmp_path / "frappe", fields=FRAPPE_FIELDS)
    schema = read_schema(out)
    assert [(f.name, f.num_embeddings, f.multi_hot) for f in schema.sparse] == [
        (name, last - first + 1, False) for name, first, last in FRAPPE_FIELDS
    ]
    table = pq.read_table(out / "part-00000.parquet")
    assert table.num_rows == 2000
    for field in schema.sparse:
        ids = table.column(field.name).to_numpy()
        assert 0 <= ids.min() and ids.max() < field.num_embeddings


# --- synth -------------------------------------------------------------------------------

TINY_SYNTH = SynthConfig(
    num_rows=3000,
    num_dense=2,
    table_sizes=(3, 50, 2000),
    multi_hot=(1, 4, 2),
    missing_rate=0.2,
    seed=7,
)


def test_synth_is_deterministic_and_learnable(tmp_path: Path):
    a = synthesize(TINY_SYNTH, tmp_path / "a", test_rows=500)
    b = synthesize(TINY_SYNTH, tmp_path / "b", test_rows=500)
    assert file_fingerprint(a) == file_fingerprint(b)
    other = synthesize(SynthConfig(**{**TINY_SYNTH.__dict__, "seed": 8}), tmp_path / "c")
    assert file_fingerprint(other / "train") != file_fingerprint(a / "train")

    schema = read_schema(a / "train")
    assert schema.dense == ("I1", "I2") and schema.table_sizes() == {"C1": 3, "C2": 50, "C3": 2000}
    assert all(f.multi_hot for f in schema.sparse)  # missing_rate > 0: empty bags
    for split, rows in (("train", 3000), ("test", 500)):
        info = read_info(a / split)
        assert info["num_rows"] == rows
        assert 0.2 < info["positive_rate"] < 0.3
        assert 0.72 < info["oracle_auc"] < 0.9
        assert info["synth"]["seed"] == 7
    bags = pq.read_table(a / "train").column("C2").to_pylist()
    sizes = np.bincount([len(bag) for bag in bags])
    assert sizes[0] > 0 and len(sizes) == 5  # empty bags, and bags of up to 4 ids


def test_synth_one_hot_power_law(tmp_path: Path):
    config = SynthConfig(num_rows=20_000, num_dense=1, table_sizes=(10_000,), seed=3)
    out = synthesize(config, tmp_path / "s")
    assert not read_schema(out / "train").sparse[0].multi_hot
    counts = np.bincount(pq.read_table(out / "train").column("C1").to_numpy(), minlength=10_000)
    top = np.sort(counts)[::-1]
    # P(rank k) ~ (k + 1.5)^-1.1: the hottest id alone draws about 10% of the rows
    assert 0.07 < top[0] / 20_000 < 0.13 and top[0] > 1.5 * top[1]
    assert np.argmax(counts) != 0  # hot ids are permuted over the table


# --- command line ------------------------------------------------------------------------


def test_cli_synth_and_convert(tmp_path: Path, capsys):
    args = ["--rows", "300", "--test-rows", "100", "--tables", "5,30", "--dense", "2"]
    assert main(["synth", "--out", str(tmp_path / "s"), *args, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"{tmp_path / 's' / 'train'}: 300 rows" in printed and "oracle AUC" in printed

    source = write_text(tmp_path / "x.libfm", LIBFM_LINES)
    fields = "a:0-2,b:3-5,c:6-6"
    out = str(tmp_path / "lfm")
    assert main(["convert", "libfm", "--out", out, "--fields", fields, str(source)]) == 0
    assert "4 rows (50.0% positive), 0 dense, 3 sparse fields" in capsys.readouterr().out

    assert main(["convert", "libfm", "--out", out + "2", "--fields", "a:0-2", str(source)]) == 2
    assert "feature id 4 is in no declared field's id range" in capsys.readouterr().err
