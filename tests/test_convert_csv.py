"""The CSV converter on a hand-written click log (tests/fixtures/csv/clicks.csv).

Its ten rows (id r01..r10) in file order; ``hour`` is 141021HH, shown as HH:

    id  click hour site_id site_category device_type tags   price
    r01 0     00   s1      news          1           a|b    1.5
    r02 1     00   s2      sport         1           b      2
    r03 0     05   s1      news          0                  0
    r04 1     01   s3      news          1           a|c    (empty)
    r05 0     02   s1      games         1           b|c|a  3.25
    r06 1     02   s2      sport         1           a      1
    r07 0     03   s1      news          0           c      0.5
    r08 1     03   s2      news          1           b      2
    r09 1     04   s4      sport         1           a|b    4
    r10 0     04   s1      "news, local" 1                  1

Split in file order (10% of 10 rows is 1): r10 is the test part, r09 validation, r01-r08
training. Training counts: site_id s1 4, s2 3, s3 1; site_category news 5, sport 2,
games 1; device_type 1 6, 0 2; tags a 4, b 4, c 3 (ties by value).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from afmrec.launch.cli import main
from afmrec.pipeline.data import (
    CsvColumns,
    CsvFormat,
    VocabConfig,
    apply_csv_vocab,
    convert_csv,
    load_vocabularies,
    read_info,
    read_schema,
)
from afmrec.pipeline.errors import InputError

CLICKS = Path(__file__).with_name("fixtures") / "csv" / "clicks.csv"
COLUMNS = CsvColumns(label="click", dense=("price",), multi_hot=(("tags", "|"),), drop=("id",),
                     time="hour")


def rows(path: Path) -> dict[str, list]:
    return pq.read_table(path / "part-00000.parquet").to_pydict()


def test_csv_row_order_split_roles_and_vocabularies(tmp_path: Path):
    columns = CsvColumns(label="click", dense=("price",), multi_hot=(("tags", "|"),),
                         drop=("id", "hour"), categorical=("site_id", "site_category", "device_type"))
    parts = convert_csv([CLICKS], tmp_path / "out", columns, progress=False)
    schema = read_schema(parts["train"])
    assert (schema.label, schema.dense) == ("click", ("price",))
    assert [(f.name, f.num_embeddings, f.multi_hot) for f in schema.sparse] == [
        ("site_id", 4, False), ("site_category", 4, False), ("device_type", 3, False),
        ("tags", 4, True)]
    assert rows(parts["train"]) == {
        "click": [0, 1, 0, 1, 0, 1, 0, 1],
        "price": [1.5, 2.0, 0.0, 0.0, 3.25, 1.0, 0.5, 2.0],
        "site_id": [1, 2, 1, 3, 1, 2, 1, 2],
        "site_category": [1, 2, 1, 1, 3, 2, 1, 1],
        "device_type": [1, 1, 2, 1, 1, 1, 2, 1],
        "tags": [[1, 2], [2], [], [1, 3], [2, 3, 1], [1], [3], [2]],
    }
    assert rows(parts["val"]) == {"click": [1], "price": [4.0], "site_id": [0],  # s4: unseen
                                  "site_category": [2], "device_type": [1], "tags": [[1, 2]]}
    assert rows(parts["test"]) == {"click": [0], "price": [1.0], "site_id": [1],
                                   "site_category": [0],  # "news, local": one quoted value
                                   "device_type": [1], "tags": [[]]}
    assert read_info(parts["val"])["split"] == {"order": "rows", "val_fraction": 0.1,
                                                "test_fraction": 0.1}


def test_csv_time_split_min_count_and_caps(tmp_path: Path):
    # By hour (ties in file order): r01 r02 r04 r05 r06 r07 r08 r09 | r10 | r03. The
    # categorical columns are the rest: site_id, site_category, device_type (not hour).
    # Training site_id: s1 3 (r01 r05 r07), s2 3, s3 1, s4 1; min count 2 keeps s1, s2.
    vocab = VocabConfig(min_count=2, field_max_sizes=(("tags", 3),))
    parts = convert_csv([CLICKS], tmp_path / "out", COLUMNS, vocab=vocab, progress=False)
    assert read_schema(parts["train"]).table_sizes() == {
        "site_id": 3, "site_category": 3, "device_type": 2, "tags": 3}  # device 0: once
    train = rows(parts["train"])
    assert train["click"] == [0, 1, 1, 0, 1, 0, 1, 1]
    assert train["site_id"] == [1, 2, 0, 1, 2, 1, 2, 0]
    # tags a 5, b 5, c 3: a cap of 3 rows keeps a and b
    assert train["tags"] == [[1, 2], [2], [1, 0], [2, 0, 1], [1], [0], [2], [1, 2]]
    assert rows(parts["val"])["price"] == [1.0]  # r10
    assert rows(parts["test"])["site_id"] == [1]  # r03
    vocabularies, recipe = load_vocabularies(tmp_path / "out" / "vocab.parquet")
    assert vocabularies["site_id"].oov_count == 2 and vocabularies["site_id"].num_values == 4
    assert recipe["columns"]["categorical"] == ["site_id", "site_category", "device_type"]


def test_csv_vocab_maps_later_days_the_same_way(tmp_path: Path):
    convert_csv([CLICKS], tmp_path / "out", COLUMNS, progress=False)
    later = tmp_path / "day2.csv.gz"  # another column order, a new site, no id column
    later.write_bytes(gzip.compress(
        b"hour,click,price,site_category,site_id,device_type,tags\n"
        b"14102200,1,7,sport,s2,0,c|z\n14102200,0,,news,s9,1,\n"))
    out = apply_csv_vocab([later], tmp_path / "day2", tmp_path / "out" / "vocab.parquet",
                          progress=False)
    assert read_schema(out) == read_schema(tmp_path / "out" / "train")
    # training vocabularies (time split): site_id s1 s2 s3 s4; site_category news sport
    # games; tags a b c
    assert rows(out) == {"click": [1, 0], "price": [7.0, 0.0], "site_id": [2, 0],
                         "site_category": [2, 1], "device_type": [2, 1], "tags": [[3, 0], []]}


def test_csv_cli_tsv_without_header_and_latin1(tmp_path: Path, capsys):
    tsv = tmp_path / "x.tsv"
    tsv.write_bytes("1\tcaf\xe9\tq\n0\tbar\tq\n1\tcaf\xe9\tr\n0\tbar\tq\n".encode("latin-1"))
    argv = ["convert", "csv", "--out", str(tmp_path / "a"), "--no-header", "--names", "y,shop,k",
            "--label", "y", "--val-fraction", "0", "--test-fraction", "0.25", "--quiet", str(tsv)]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"afmrec convert: error: {tsv}:1: not valid utf-8 text (bytes b'\\xe9\\tq\\n'); "
        "pass --encoding (e.g. latin-1)\n")
    assert main([*argv, "--encoding", "latin-1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == [
        f"{tmp_path / 'a' / 'train'}: 3 rows (66.7% positive), 0 dense, 2 sparse fields (tables of 3 rows)",
        f"{tmp_path / 'a' / 'test'}: 1 rows (0.0% positive), 0 dense, 2 sparse fields (tables of 3 rows)",
    ]
    vocabularies, _ = load_vocabularies(tmp_path / "a" / "vocab.parquet")
    assert vocabularies["shop"].values.to_pylist() == ["café", "bar"]
    assert rows(tmp_path / "a" / "train")["shop"] == [1, 2, 1]


@pytest.mark.reliability
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--label", "nope"], "no column(s) ['nope'] in the input"),
        (["--label", "click", "--categorical", "site_id"],
         "column(s) ['id', 'hour', 'site_category', 'device_type', 'tags', 'price'] have no role"),
        (["--label", "click", "--dense", "site_id"], ":2: dense column 'site_id' must be a number, got 's1'"),
        (["--label", "site_id"], ":2: label 'site_id' must be 0 or 1, got 's1'"),
        (["--label", "click", "--time-column", "site_id"],
         ":2: time column 'site_id' must be a number or an ISO date, got 's1'"),
        (["--label", "click", "--dense", "id", "--drop", "id"], "column(s) ['id'] are given more than one role"),
        (["--label", "click", "--multi-hot", "tags"], "--multi-hot 'tags': expected COL:SEP"),
        (["--label", "click", "--max-table-size", "tags=1"], "a table cap must be an integer >= 2"),
        (["--label", "click", "--max-table-size", "nope=5"], "table cap for ['nope'], which are not"),
        (["--vocab", "v.parquet", "--label", "click"], "leave out --label"),
    ],
)
def test_csv_bad_options_and_values_are_one_line(tmp_path: Path, capsys, argv, message):
    assert main(["convert", "csv", "--out", str(tmp_path / "o"), *argv, str(CLICKS)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.reliability
def test_csv_ragged_line_names_its_line(tmp_path: Path):
    bad = tmp_path / "bad.csv"
    bad.write_text(CLICKS.read_text().replace("r07,0,14102103,s1,news,0,c,0.5", "r07,0,1"))
    with pytest.raises(InputError) as error:
        convert_csv([bad], tmp_path / "o", COLUMNS, progress=False)
    assert str(error.value) == f"{bad}:8: expected 8 fields, got 3"
    with pytest.raises(InputError, match="a file without a header needs its column names"):
        CsvFormat(header=False)
