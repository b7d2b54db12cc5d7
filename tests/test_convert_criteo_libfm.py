"""Criteo with per-field vocabularies, and libFM fields from a feature index file."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from afmrec.launch.cli import main
from afmrec.pipeline.data import (
    DataSchema,
    SparseField,
    SplitConfig,
    VocabConfig,
    apply_criteo_vocab,
    convert_criteo_vocab,
    convert_libfm,
    load_vocabularies,
    read_feature_index,
    read_schema,
)
from afmrec.pipeline.errors import InputError
from tests.test_data import LIBFM_LINES, criteo_line, write_text

# Ten rows, in file (time) order: C1 is "a" four times, "b" three times, "c" once
# in the first eight (training) rows; C2 is empty except in rows 1 and 9; the other
# fields are empty. Row 9 is validation, row 10 test.
C1 = ["a", "b", "a", "c", "a", "b", "a", "b", "d", "a"]
C2 = {0: "ff", 8: "ff"}
LINES = [criteo_line(str(i % 2), {1: str(i)}, {1: c1, **({2: C2[i]} if i in C2 else {})})
         for i, c1 in enumerate(C1)]


def rows(path: Path) -> dict[str, list]:
    return pq.read_table(path / "part-00000.parquet").to_pydict()


def test_criteo_vocabularies_split_in_file_order(tmp_path: Path):
    source = write_text(tmp_path / "day.tsv", LINES)
    parts = convert_criteo_vocab([source], tmp_path / "out", vocab=VocabConfig(min_count=2),
                                 progress=False)
    sizes = read_schema(parts["train"]).table_sizes()
    # C1: a (4) and b (3) kept, c (once) below min count; C2: ff once; others: no value
    assert sizes["C1"] == 3 and sizes["C2"] == 1 and set(sizes.values()) == {1, 3}
    train = rows(parts["train"])
    assert train["C1"] == [[1], [2], [1], [0], [1], [2], [1], [2]]
    assert train["C2"] == [[0], [], [], [], [], [], [], []]  # an empty field: an empty bag
    assert train["I1"] == pytest.approx([math.log1p(i) for i in range(8)])
    assert train["label"] == [0, 1, 0, 1, 0, 1, 0, 1]
    assert rows(parts["val"])["C1"] == [[0]] and rows(parts["test"])["C1"] == [[1]]
    # the 100,000-row default of hashing would give 26 x 100,000 rows
    assert sum(sizes.values()) == 3 + 1 + 24


def test_criteo_vocab_applies_to_a_later_day_and_cli(tmp_path: Path, capsys):
    source = write_text(tmp_path / "day0.tsv", LINES)
    out = tmp_path / "out"
    assert main(["convert", "criteo", "--out", str(out), "--quiet", "--max-table-size", "C1=3",
                 "--val-fraction", "0", str(source)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == (f"{out / 'train'}: 9 rows (44.4% positive), 13 dense, 26 sparse "
                          "fields (tables of 1 to 3 rows)")
    assert printed[-1] == (f"{out / 'vocab.parquet'}: 26 vocabularies from the training rows, "
                           "3 of 5 distinct values kept (min count 1, caps 3), 2 training "
                           "occurrences mapped to the OOV row")  # C1: c and d beyond the cap
    day1 = tmp_path / "day1.tsv.gz"
    day1.write_bytes(gzip.compress("\n".join([criteo_line("1", {}, {1: "b", 2: "ff"}),
                                              criteo_line("0", {}, {1: "zz"})]).encode()))
    later = tmp_path / "day1"
    assert main(["convert", "criteo", "--out", str(later), "--quiet", "--vocab",
                 str(out / "vocab.parquet"), str(day1)]) == 0
    assert read_schema(later) == read_schema(out / "train")
    assert rows(later)["C1"] == [[2], [0]] and rows(later)["C2"] == [[1], []]
    with pytest.raises(InputError, match="nope: vocabulary file not found"):
        apply_criteo_vocab([day1], tmp_path / "x", tmp_path / "nope")
    assert load_vocabularies(out / "vocab.parquet")[1] == {"format": "criteo"}


def test_criteo_hashing_stays_an_option(tmp_path: Path, capsys):
    source = write_text(tmp_path / "day.tsv", LINES)
    out = tmp_path / "hashed"
    assert main(["convert", "criteo", "--out", str(out), "--table-size", "7", "--quiet",
                 str(source)]) == 0
    assert capsys.readouterr().out == (f"{out}: 10 rows (50.0% positive), 13 dense, 26 sparse "
                                       "fields (tables of 7 rows)\n")
    assert rows(out)["C1"][0] == [0xA % 7]


def test_libfm_feature_index(tmp_path: Path, capsys):
    index = tmp_path / "x.index"
    # fields a: ids 0-2, b: 3-5, c: 6; listed in any order; values may hold ":"
    index.write_text("b:x\t3\nb:y\t5\na:u\t0\nc:1:30\t6\na:v\t2\nb:z\t4\na:w\t1\n")
    assert read_feature_index(index) == [("a", 0, 2), ("b", 3, 5), ("c", 6, 6)]
    source = write_text(tmp_path / "x.libfm", LIBFM_LINES)
    out = tmp_path / "lfm"
    assert main(["convert", "libfm", "--out", str(out), "--feature-index", str(index), "--quiet",
                 str(source)]) == 0
    assert read_schema(out) == DataSchema(
        dense=(), sparse=(SparseField("a", 3), SparseField("b", 3, multi_hot=True), SparseField("c", 1)))
    assert rows(out) == rows(convert_libfm([source], tmp_path / "ref",
                                           fields=[("a", 0, 2), ("b", 3, 5), ("c", 6, 6)]))


@pytest.mark.reliability
@pytest.mark.parametrize(
    "text, message",
    [
        ("a:u\t0\nb:x\t1\na:v\t2\n", "x.index: libFM fields 'a' and 'b' have overlapping id ranges"),
        ("a:u\t0\nnocolon\t1\n", "x.index:2: 'nocolon' is not field:value"),
        ("a:u\t0\na:v\tseven\n", "x.index:2: id must be an integer, got 'seven'"),
        ("a:u\t0\na:v 1\n", "x.index:2: expected 2 tab-separated fields, got 1"),
    ],
)
def test_libfm_bad_feature_index(tmp_path: Path, text, message):
    index = tmp_path / "x.index"
    index.write_text(text)
    with pytest.raises(InputError) as error:
        read_feature_index(index)
    assert str(error.value) == f"{tmp_path}/{message}"


def test_split_config_sizes():
    assert SplitConfig().sizes(360_434) == {"train": 288_348, "val": 36_043, "test": 36_043}
    assert SplitConfig(0, 0).sizes(5) == {"train": 5}
    with pytest.raises(InputError, match="too few to split"):
        SplitConfig().sizes(4)  # 10% of 4 rounds to 0
    with pytest.raises(InputError, match="must be < 1"):
        SplitConfig(0.5, 0.5)
