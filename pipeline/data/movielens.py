"""MovieLens-1M (ratings + users + movies) to train / validation / test datasets.

The three ``::``-separated files of ML-1M (GroupLens' README describes them):

* ``ratings.dat`` (or ``ratings.dat.gz``): ``UserID::MovieID::Rating::Timestamp``;
* ``users.dat``: ``UserID::Gender::Age::Occupation::Zip-code``;
* ``movies.dat``: ``MovieID::Title::Genres``, genres joined by ``|``; ISO-8859-1 text.

Each rating becomes a row, in the usual CTR form (RecBole's ``ml-1m_context``): ratings of 3
are dropped, 1-2 give label 0 and 4-5 label 1. Its sparse fields are ``user_id``,
``movie_id``, ``gender``, ``age``, ``occupation``, ``zip`` (one id each) and ``genres`` (a
multi-hot bag of the movie's genres), joined on the user and movie ids. Rows are sorted
by timestamp (ties in file order) and split by time (see :mod:`.splits`); the
vocabularies are built from the training part only (see :mod:`.vocab`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from ..artifacts import check_not_input
from ..errors import InputError
from .encode import Fields, RawBlock, convert_with_vocabularies
from .splits import SplitConfig
from .textio import Where, cast_or_fail, check_field_counts, progress_bar, read_bytes, split_bags
from .vocab import VocabConfig

USER_FIELDS = ("gender", "age", "occupation", "zip")
SPARSE_FIELDS = ("user_id", "movie_id", *USER_FIELDS, "genres")
LABEL_RULE = "rating 3 dropped; 1-2 -> 0, 4-5 -> 1"
# Bytes standing for "::" while Arrow parses (its delimiter is one byte): the ASCII unit
# separator, which text never holds (checked).
_SEPARATOR = "\x1f"
_FILES = {
    "ratings": ("ratings.dat", ("user", "movie", "rating", "timestamp"), "utf-8"),
    "users": ("users.dat", ("user", *USER_FIELDS), "utf-8"),
    "movies": ("movies.dat", ("movie", "title", "genres"), "latin-1"),
}


def convert_movielens(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = True,
    split: SplitConfig = SplitConfig(),
    vocab: VocabConfig = VocabConfig(),
) -> dict[str, Path]:
    """Converts the MovieLens-1M folder ``src`` to ``out/train``, ``out/val``, ``out/test``.

    Also writes ``out/vocab.parquet``: the value of every row of every table. All three
    datasets have the same schema (tables sized by the training part's vocabularies).

    Args:
        src: folder holding ``ratings.dat[.gz]``, ``users.dat[.gz]``, ``movies.dat[.gz]``.
        out: the folder to create.
        overwrite: replace an existing ``out`` (once the new one is complete).
        progress: show a progress bar (on a terminal).
        split: the fractions of validation and test rows (the latest ones).
        vocab: minimum count and cap of every field's vocabulary.

    Returns:
        The dataset folder of each part: ``{"train": out/train, "val": ..., "test": ...}``.

    Raises:
        InputError: a missing file, a malformed line (naming file and line), a rating of
            an unknown user or movie, damaged gzip data; ``out`` exists.

    Example::

        parts = convert_movielens("ml-1m", "data/ml1m")
        # afmrec train --data data/ml1m/train --val data/ml1m/val ...
    """
    src, out = Path(src), Path(out)
    paths = {kind: _find(src, name) for kind, (name, _, _) in _FILES.items()}
    check_not_input(out, *paths.values())
    with progress_bar(list(paths.values()), "movielens", progress) as bar:
        tables = {}
        for kind, path in paths.items():
            tables[kind] = _read_dat(path, *_FILES[kind][1:])
            bar.update(path.stat().st_size)
    rows = _join(paths, tables)
    rows = rows.take(pc.sort_indices(rows, [("timestamp", "ascending")]))  # stable
    block = RawBlock(
        source=str(paths["ratings"]),
        label=rows.column("label").to_numpy(),
        dense={},
        categorical={name: rows.column(name).combine_chunks() for name in SPARSE_FIELDS},
    )
    fields = Fields(label="label", dense=(), multi_hot={n: n == "genres" for n in SPARSE_FIELDS})
    info = {"source": {"format": "movielens-1m", "inputs": [str(p) for p in paths.values()],
                       "label_rule": LABEL_RULE}}
    recipe = {"format": "movielens-1m", "label_rule": LABEL_RULE}
    # The rows are in time order: the engine's split in row order is the split by time.
    return convert_with_vocabularies(lambda desc: iter([block]), out, fields, split=split,
                                     vocab=vocab, order_name="timestamp", info=info,
                                     recipe=recipe, overwrite=overwrite)


def _find(src: Path, name: str) -> Path:
    if not src.is_dir():
        raise InputError(f"{src}: not a folder (expected the MovieLens-1M folder)")
    for candidate in (src / name, src / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise InputError(f"{src}: no {name} or {name}.gz (expected MovieLens-1M's "
                     "ratings.dat, users.dat and movies.dat)")


def _read_dat(path: Path, names: tuple[str, ...], encoding: str) -> pa.Table:
    """The ``::``-separated ``path`` as a table of strings, one column per name."""
    hint = f"MovieLens-1M's {path.name.split('.')[0]}.dat is {encoding} text"
    text = read_bytes(path, encoding, hint).replace(b"\r\n", b"\n")
    where = Where(path, 1)
    if _SEPARATOR.encode() in text:
        row = text.count(b"\n", 0, text.index(_SEPARATOR.encode()))
        raise where.error(row, "unexpected control character \\x1f")
    text = text.replace(b"::", _SEPARATOR.encode())
    check_field_counts(text, len(names), where, delimiter=_SEPARATOR.encode(), name="'::'")
    if not text.strip():
        raise InputError(f"{path}: no data lines")
    return pa_csv.read_csv(
        pa.py_buffer(text),
        read_options=pa_csv.ReadOptions(column_names=names),
        parse_options=pa_csv.ParseOptions(delimiter=_SEPARATOR, quote_char=False,
                                          ignore_empty_lines=False),
        convert_options=pa_csv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()),
                                              strings_can_be_null=False),
    )


def _integers(table: pa.Table, name: str, where: Where) -> np.ndarray:
    strings = table.column(name).combine_chunks()

    def bad(row: int) -> InputError:
        return where.error(row, f"{name} must be an integer, got {strings[row].as_py()!r}")

    return cast_or_fail(strings, pa.int64(), bad).to_numpy()


def _index(keys: pa.Table, name: str, path: Path) -> pa.Array:
    """``keys``' ``name`` column, refusing duplicate ids."""
    column = keys.column(name).combine_chunks()
    if pc.count_distinct(column).as_py() != len(column):
        counts = pc.value_counts(column)
        duplicate = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise InputError(f"{path}: {name} {duplicate!r} appears more than once")
    return column


def _join(paths: dict[str, Path], tables: dict[str, pa.Table]) -> pa.Table:
    """Labelled rows (rating 3 dropped) with the user's and movie's fields, and timestamps."""
    ratings, users, movies = tables["ratings"], tables["users"], tables["movies"]
    where = Where(paths["ratings"], 1)
    for name in ("user", "movie", "timestamp"):
        _integers(ratings, name, where)  # named errors for malformed numbers
    rating = _integers(ratings, "rating", where)
    outside = np.flatnonzero((rating < 1) | (rating > 5))
    if outside.size:
        raise where.error(outside[0], f"rating must be 1 to 5, got {rating[outside[0]]}")
    user_row = pc.index_in(ratings.column("user"), value_set=_index(users, "user", paths["users"]))
    movie_row = pc.index_in(ratings.column("movie"), value_set=_index(movies, "movie", paths["movies"]))
    for what, found, table in (("user", user_row, "users"), ("movie", movie_row, "movies")):
        missing = np.flatnonzero(pc.is_null(found).to_numpy(zero_copy_only=False))
        if missing.size:
            value = ratings.column(what)[missing[0]].as_py()
            raise where.error(missing[0], f"{what} {value} is not in {table}.dat")
    keep = pa.array(rating != 3)
    user_row, movie_row = pc.filter(user_row, keep), pc.filter(movie_row, keep)
    genres = split_bags(movies.column("genres").combine_chunks(), "|")
    columns = {
        "label": pa.array((rating[rating != 3] >= 4).astype(np.int8)),
        "timestamp": pc.cast(pc.filter(ratings.column("timestamp"), keep), pa.int64()),
        "user_id": pc.filter(ratings.column("user"), keep),
        "movie_id": pc.filter(ratings.column("movie"), keep),
        **{name: users.column(name).take(user_row) for name in USER_FIELDS},
        "genres": genres.take(movie_row),
    }
    return pa.table(columns)
