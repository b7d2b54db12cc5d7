"""The MovieLens-1M converter on a hand-written fixture (tests/fixtures/movielens).

The fixture's 13 ratings keep 10 (three are 3s). In time order (timestamps 9783000xx):

    ts    user movie rating label      ts    user movie rating label
    050   3    10    5      1          700   3    30    5      1
    200   1    30    1      0          760   1    10    5      1
    300   2    10    4      1          800   1    30    4      1
    400   2    20    2      0          1000  2    20    1      0   <- validation
    600   3    20    4      1          1100  4    30    5      1   <- test

10% of 10 rows is 1: the last row is the test part, the one before it validation, the
first 8 the training part. Training counts give the vocabularies (ties by value):
users 1 (3), 3 (3), 2 (2); movies 10 (3), 30 (3), 20 (2); genres Drama 6, Sci-Fi 5,
Comedy 3, Thriller 3. User 4, age 45, occupation 7 and zip 02460 only appear in the test
row: out of vocabulary there (row 0).
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from afmrec.launch.cli import main
from afmrec.pipeline.data import (
    VOCAB_FILE,
    ParquetBatches,
    SplitConfig,
    VocabConfig,
    convert_movielens,
    load_vocabularies,
    read_info,
    read_schema,
)
from afmrec.pipeline.errors import InputError

FIXTURE = Path(__file__).with_name("fixtures") / "movielens"
ML1M = Path(__file__).resolve().parents[2] / "shared/data/movielens1m"
SIZES = {"user_id": 4, "movie_id": 4, "gender": 3, "age": 4, "occupation": 4, "zip": 4,
         "genres": 5}


def rows(path: Path) -> dict[str, list]:
    return pq.read_table(path / "part-00000.parquet").to_pydict()


def test_movielens_fixture_labels_time_split_and_vocabularies(tmp_path: Path):
    parts = convert_movielens(FIXTURE, tmp_path / "ml", progress=False)
    assert parts == {name: tmp_path / "ml" / name for name in ("train", "val", "test")}
    for path in parts.values():
        schema = read_schema(path)
        assert schema.table_sizes() == SIZES and schema.dense == ()
        assert [f.name for f in schema.sparse if f.multi_hot] == ["genres"]
    assert rows(parts["train"]) == {
        "label": [1, 0, 1, 0, 1, 1, 1, 1],
        "user_id": [2, 1, 3, 3, 2, 2, 1, 1],
        "movie_id": [1, 2, 1, 3, 3, 2, 1, 2],
        "gender": [1, 2, 1, 1, 1, 1, 2, 2],  # M (5 rows) 1, F (3) 2
        "age": [2, 1, 3, 3, 2, 2, 1, 1],  # "1" (3), "25" (3), "56" (2)
        "occupation": [2, 1, 3, 3, 2, 2, 1, 1],  # "10", "15", "16"
        "zip": [2, 1, 3, 3, 2, 2, 1, 1],  # "48067", "55117", "70072"
        "genres": [[3, 1], [1, 2, 4], [3, 1], [2], [2], [1, 2, 4], [3, 1], [1, 2, 4]],
    }
    assert rows(parts["val"]) == {
        "label": [0], "user_id": [3], "movie_id": [3], "gender": [1], "age": [3],
        "occupation": [3], "zip": [3], "genres": [[2]],
    }
    assert rows(parts["test"]) == {
        "label": [1], "user_id": [0], "movie_id": [2], "gender": [2], "age": [0],
        "occupation": [0], "zip": [0], "genres": [[1, 2, 4]],
    }
    info = read_info(parts["train"])
    assert (info["num_rows"], info["num_positives"]) == (8, 6)
    assert info["source"]["label_rule"] == "rating 3 dropped; 1-2 -> 0, 4-5 -> 1"
    (batch,) = ParquetBatches(parts["train"], 8)
    assert batch.sparse_features["genres"].lengths().tolist() == [2, 3, 2, 1, 1, 3, 2, 3]


def test_movielens_vocabulary_file_and_options(tmp_path: Path):
    convert_movielens(FIXTURE, tmp_path / "ml", progress=False)
    vocabularies, recipe = load_vocabularies(tmp_path / "ml" / VOCAB_FILE)
    assert list(vocabularies) == list(SIZES)
    assert vocabularies["user_id"].values.to_pylist() == ["1", "3", "2"]
    assert vocabularies["genres"].values.to_pylist() == ["Drama", "Sci-Fi", "Comedy", "Thriller"]
    assert vocabularies["genres"].counts.tolist() == [6, 5, 3, 3]
    assert vocabularies["zip"].values.to_pylist() == ["48067", "55117", "70072"]
    assert recipe["format"] == "movielens-1m"

    # min count 3: user 2, movie 20, age 56, occupation 16, zip 70072 (2 training rows
    # each) go to row 0; every genre has 3 or more.
    parts = convert_movielens(FIXTURE, tmp_path / "min", progress=False,
                              vocab=VocabConfig(min_count=3))
    assert read_schema(parts["train"]).table_sizes() == {**dict.fromkeys(SIZES, 3), "genres": 5}
    train = rows(parts["train"])
    assert train["user_id"] == [2, 1, 0, 0, 2, 2, 1, 1]
    assert train["movie_id"] == [1, 2, 1, 0, 0, 2, 1, 2]
    assert rows(parts["val"])["user_id"] == [0]

    # No validation part: 9 training rows (user 2's rating at 1000 joins them), every
    # user, movie and age 3 times; a cap of 3 rows keeps the first two by value, and the
    # genres Drama (6) and Sci-Fi (6): a bag's other genres map to row 0.
    parts = convert_movielens(FIXTURE, tmp_path / "cap", progress=False,
                              split=SplitConfig(val_fraction=0, test_fraction=0.1),
                              vocab=VocabConfig(max_size=3))
    assert list(parts) == ["train", "test"]
    assert read_schema(parts["train"]).table_sizes() == dict.fromkeys(SIZES, 3)
    train = rows(parts["train"])
    assert train["user_id"] == [0, 1, 2, 2, 0, 0, 1, 1, 2]
    assert train["genres"][:4] == [[0, 1], [1, 2, 0], [0, 1], [2]]
    assert rows(parts["test"]) == {
        "label": [1], "user_id": [0], "movie_id": [0], "gender": [2], "age": [0],
        "occupation": [0], "zip": [0], "genres": [[1, 2, 0]],
    }


def test_movielens_gzip_ratings_and_cli(tmp_path: Path, capsys):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    with open(src / "ratings.dat", "rb") as f, gzip.open(src / "ratings.dat.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    (src / "ratings.dat").unlink()
    out = tmp_path / "cli"
    assert main(["convert", "movielens", "--out", str(out), "--quiet", str(src)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"{out / 'train'}: 8 rows (75.0% positive), 0 dense, 7 sparse fields (tables of 3 to 5 rows)",
        f"{out / 'val'}: 1 rows (0.0% positive), 0 dense, 7 sparse fields (tables of 3 to 5 rows)",
        f"{out / 'test'}: 1 rows (100.0% positive), 0 dense, 7 sparse fields (tables of 3 to 5 rows)",
        f"{out / 'vocab.parquet'}: 7 vocabularies from the training rows, 21 of 21 distinct "
        "values kept (min count 1), 0 training occurrences mapped to the OOV row",
    ]
    reference = convert_movielens(FIXTURE, tmp_path / "plain", progress=False)
    for name, path in reference.items():
        assert rows(out / name) == rows(path)
    assert main(["convert", "movielens", "--out", str(out), str(src)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.reliability
@pytest.mark.parametrize(
    "line, message",
    [
        ("4::99::5::978301200", "ratings.dat:14: movie 99 is not in movies.dat"),
        ("9::10::5::978301200", "ratings.dat:14: user 9 is not in users.dat"),
        ("4::10::6::978301200", "ratings.dat:14: rating must be 1 to 5, got 6"),
        ("4::10::5", "ratings.dat:14: expected 4 '::'-separated fields, got 3"),
        ("4::10::x::978301200", "ratings.dat:14: rating must be an integer, got 'x'"),
    ],
)
def test_movielens_bad_ratings_name_file_and_line(tmp_path: Path, line, message):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    with open(src / "ratings.dat", "a") as f:
        f.write(line + "\n")
    with pytest.raises(InputError) as error:
        convert_movielens(src, tmp_path / "out", progress=False)
    assert str(error.value) == f"{src}/{message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.reliability
def test_movielens_missing_files_and_duplicate_ids(tmp_path: Path):
    with pytest.raises(InputError, match="no ratings.dat or ratings.dat.gz"):
        convert_movielens(tmp_path, tmp_path / "out")
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    with open(src / "users.dat", "a") as f:
        f.write("2::F::18::3::12345\n")
    with pytest.raises(InputError, match=r"users.dat: user '2' appears more than once"):
        convert_movielens(src, tmp_path / "out", progress=False)


@pytest.mark.skipif(not (ML1M / "ratings.dat.gz").is_file(), reason="MovieLens-1M is not in ../shared/data")
def test_movielens_1m_real_data(tmp_path: Path):
    """The PROVENANCE.md numbers: 360,434 rows kept, 279,124 positive."""
    parts = convert_movielens(ML1M, tmp_path / "ml1m", progress=False)
    infos = {name: read_info(path) for name, path in parts.items()}
    assert {n: i["num_rows"] for n, i in infos.items()} == {
        "train": 288_348, "val": 36_043, "test": 36_043}
    assert sum(i["num_positives"] for i in infos.values()) == 279_124
    assert read_schema(parts["train"]).table_sizes() == {
        "user_id": 2761, "movie_id": 3526, "gender": 3, "age": 8, "occupation": 22,
        "zip": 1891, "genres": 19}
