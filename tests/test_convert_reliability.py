"""Damaged or unusual files given to the converters (issue 22): the real CLI, in a
subprocess, must print one line ``afmrec convert: error: FILE...`` and exit 2, with no
traceback and no output left behind.

Cases: gzip streams cut short, with corrupt deflate data, with a wrong CRC, or that are
not gzip after the magic bytes; text in UTF-16 or Latin-1 where UTF-8 is expected.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_data import CRITEO_LINES, LIBFM_LINES

pytestmark = pytest.mark.reliability

FIXTURES = Path(__file__).with_name("fixtures")
CLICKS = FIXTURES / "csv" / "clicks.csv"
CHILD_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TRUNCATED = "damaged gzip data (Compressed file ended before the end-of-stream marker was reached)"


def convert(*argv: str) -> subprocess.CompletedProcess:
    """``afmrec convert ARGV`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "afmrec.launch.cli", "convert", *argv],
                          capture_output=True, text=True, timeout=120, env=CHILD_ENV)


def assert_one_line_error(result: subprocess.CompletedProcess, out: Path, expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"afmrec convert: error: {expected}\n"
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def corrupt_deflate(data: bytes) -> bytes:
    # bytes 10.. are the deflate stream (no optional header fields): a stored-block-less
    # stream whose first block header is set to the reserved type 3 is invalid
    return data[:10] + bytes([data[10] | 0b110]) + data[11:]


def wrong_crc(data: bytes) -> bytes:
    return data[:-8] + bytes([data[-8] ^ 0xFF]) + data[-7:]


def big_text(lines: list[str], copies: int) -> bytes:
    return ("\n".join(lines * copies) + "\n").encode()


@pytest.mark.parametrize(
    "damage, expected",
    [
        (cut, TRUNCATED),
        (corrupt_deflate, "damaged gzip data (Error -3 while decompressing data: invalid block type)"),
        (wrong_crc, "damaged gzip data (CRC check failed"),
        (lambda data: data[:2] + b"not gzip at all", "damaged gzip data (Unknown compression method)"),
    ],
    ids=["truncated", "corrupt-deflate", "wrong-crc", "bad-header"],
)
def test_criteo_damaged_gzip(tmp_path: Path, damage, expected):
    source = tmp_path / "day_0.gz"
    source.write_bytes(damage(gzip.compress(big_text(CRITEO_LINES, 2000))))
    out = tmp_path / "out"
    result = convert("criteo", "--out", str(out), "--quiet", str(source))
    assert result.stderr.startswith(f"afmrec convert: error: {source}: {expected}")
    assert_one_line_error(result, out, result.stderr[len("afmrec convert: error: "):-1])
    assert result.stderr.endswith("; the file is truncated or corrupt\n")


def test_csv_truncated_gzip(tmp_path: Path):
    source = tmp_path / "clicks.csv.gz"  # the error comes after the first blocks were read
    body = CLICKS.read_bytes() + b"".join(CLICKS.read_bytes().split(b"\n", 1)[1:]) * 3000
    source.write_bytes(cut(gzip.compress(body)))
    out = tmp_path / "out"
    result = convert("csv", "--out", str(out), "--label", "click", "--drop", "id", "--quiet",
                     str(source))
    assert_one_line_error(result, out, f"{source}: {TRUNCATED}; the file is truncated or corrupt")


def test_libfm_truncated_gzip_named_without_gz(tmp_path: Path):
    source = tmp_path / "train.libfm"  # gzip is recognised by its bytes, not its name
    source.write_bytes(cut(gzip.compress(big_text(LIBFM_LINES, 5000))))
    out = tmp_path / "out"
    result = convert("libfm", "--out", str(out), "--fields", "a:0-2,b:3-5,c:6-6", "--quiet", str(source))
    assert_one_line_error(result, out, f"{source}: {TRUNCATED}; the file is truncated or corrupt")


def test_movielens_truncated_ratings(tmp_path: Path):
    src = tmp_path / "ml"
    shutil.copytree(FIXTURES / "movielens", src)
    (src / "ratings.dat.gz").write_bytes(cut(gzip.compress((src / "ratings.dat").read_bytes() * 50)))
    (src / "ratings.dat").unlink()
    out = tmp_path / "out"
    result = convert("movielens", "--out", str(out), "--quiet", str(src))
    assert_one_line_error(result, out, f"{src / 'ratings.dat.gz'}: {TRUNCATED}; the file is "
                          "truncated or corrupt")


UTF16 = ("NUL bytes: this looks like UTF-16 or UTF-32 text (or binary data); convert it to "
         "UTF-8 first, e.g. `iconv -f UTF-16 -t UTF-8`")


def test_csv_utf16(tmp_path: Path):
    source = tmp_path / "clicks.csv"
    source.write_bytes(CLICKS.read_text().encode("utf-16"))
    out = tmp_path / "out"
    result = convert("csv", "--out", str(out), "--label", "click", "--quiet", str(source))
    assert_one_line_error(result, out, f"{source}:1: {UTF16}")


def test_criteo_utf16(tmp_path: Path):
    source = tmp_path / "day_0"
    source.write_bytes("\n".join(CRITEO_LINES).encode("utf-16-le"))
    out = tmp_path / "out"
    result = convert("criteo", "--out", str(out), "--quiet", str(source))
    assert_one_line_error(result, out, f"{source}:1: {UTF16}")


def test_libfm_latin1(tmp_path: Path):
    source = tmp_path / "x.libfm"
    source.write_bytes("\n".join([*LIBFM_LINES, "1 0:1 # caf\xe9"]).encode("latin-1"))
    out = tmp_path / "out"
    result = convert("libfm", "--out", str(out), "--fields", "a:0-2,b:3-5,c:6-6", "--quiet", str(source))
    assert_one_line_error(result, out, f"{source}:5: not valid utf-8 text (bytes b'\\xe9\\n'); "
                          "libFM text is ASCII: the file may be damaged")


def test_movielens_latin1_users(tmp_path: Path):
    """Run 4 times: before the CLI freed the error's traceback while the interpreter was
    whole, 2 exits in 5 aborted after printing the line ("terminate called without an
    active exception": Arrow tables freed as the interpreter was torn down)."""
    src = tmp_path / "ml"
    shutil.copytree(FIXTURES / "movielens", src)
    with open(src / "users.dat", "ab") as f:
        f.write("5::F::18::3::M\xfcnchen\n".encode("latin-1"))
    out = tmp_path / "out"
    for _ in range(4):
        result = convert("movielens", "--out", str(out), "--quiet", str(src))
        assert_one_line_error(result, out, f"{src / 'users.dat'}:5: not valid utf-8 text (bytes "
                              "b'\\xfcnch'); MovieLens-1M's users.dat is utf-8 text")


def test_output_piped_to_a_reader_that_stops(tmp_path: Path):
    """`afmrec convert ... | head -1`: the dataset is written, and the closed pipe is no
    traceback (BrokenPipeError) but exit status 1."""
    out = tmp_path / "out"
    script = (f"{sys.executable} -m afmrec.launch.cli convert csv --out {out} --label click "
              f"--drop id --quiet {CLICKS} | head -1; echo rc=${{PIPESTATUS[0]}}")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                            env=CHILD_ENV)
    assert result.stdout.splitlines() == [
        f"{out / 'train'}: 8 rows (50.0% positive), 0 dense, 6 sparse fields (tables of 3 to 8 rows)",
        "rc=1"]
    assert result.stderr == "" and (out / "test").is_dir()
