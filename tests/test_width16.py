"""A table-dominated model of width-16 tables, compressed 3.5-8x end to end with the
CLI's defaults: statistics and fine-tuning on 2 ranks under torchrun, export in every row
format, and what the planner says where no format reaches a target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pyarrow.parquet as pq
import pytest

from afmrec.launch.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
MODEL = ["--embedding-dim", "16", "--over-arch", "16,1", "--quiet"]


def torchrun(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "afmrec.launch.cli", *argv, "--device", "cpu"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Data whose tables hold 99% of the parameters, a trained DLRM, and its statistics
    (with the loss probes) collected on 2 ranks."""
    root = tmp_path_factory.mktemp("w16")
    data = root / "data"
    assert main(["synth", "--out", str(data), "--rows", "8000", "--test-rows", "2000",
                 "--tables", "20000,12000,6000,50", "--dense", "2", "--quiet"]) == 0
    assert main(["train", "--data", str(data / "train"), "--epochs", "1", "--batch-size", "256",
                 "--out", str(root / "original"), *MODEL]) == 0
    result = torchrun("stats", "--model", str(root / "original"), "--data", str(data / "train"),
                      "--out", str(root / "stats.pt"), "--quiet")
    assert (root / "stats.pt").is_file(), result.stderr[-3000:]
    return root


def compress(run, out, *options):
    return main(["compress", "--model", str(run / "original"), "--stats", str(run / "stats.pt"),
                 "--out", str(out), "--quiet", *options])


def test_defaults_plan_the_loss_policy_within_ten_percent(run, capsys):
    """`--ratio 3.5` with every default: the loss policy (probes from the 2-rank stats),
    int8 tables (16-byte rows hold rank 12 in int8, 4 in fp32: auto keeps the plan that
    drops the least), bytes within 10% of the target."""
    out = run / "afm35"
    assert compress(run, out, "--ratio", "3.5") == 0
    plan = json.loads((out / "model.json").read_text())["plan"]
    assert (plan["policy"], plan["table_format"], plan["serve_device"]) == ("loss", "int8", "cuda")
    assert 3.5 / 1.1 <= plan["ratio"] <= 3.5 * 1.1
    # the fp32 checkpoint holds rank-12 tables: it shrinks far less than the served model
    assert plan["checkpoint_bytes_before"] / plan["checkpoint_bytes_after"] < plan["ratio"] / 2
    rows = pq.read_table(out / "ranks.parquet").to_pylist()
    assert {r["policy"] for r in rows} == {"loss"}
    assert all(r["rank"] % 4 == 0 for r in rows if r["kind"] == "table" and r["compressed"])
    assert all(r["loss_weight"] is not None for r in rows if r["kind"] == "table")
    printed = capsys.readouterr().out
    assert "(loss policy)" in printed and "served with int8 tables on cuda" in printed


def test_beyond_what_cuda_rows_hold_the_planner_says_what_reaches_it(run, capsys):
    """On CUDA every row is padded to 16 bytes: a width-16 fp32 table (64 bytes a row)
    shrinks at most 4x in any format, so 6x is refused, naming the ratios that each
    format and device reach; nothing is written."""
    capsys.readouterr()
    assert compress(run, run / "refused", "--ratio", "6") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "target ratio 6 is unreachable with fp32, fp16, int8 tables served on cuda" in err[0]
    assert "int8 on cpu" in err[0] and "--serve-device" in err[0]
    assert not (run / "refused").exists()


def test_six_x_served_on_cpu_finetunes_on_two_ranks_and_exports(run, tmp_path):
    """6x for CPU serving: auto picks 16-bit or 8-bit rows; the model fine-tunes on 2
    ranks (its tables' widths are multiples of 4, as FBGEMM's fused kernels need), and
    exports in fp32, fp16 and int8; the default export format is the plan's, and that
    artifact is within 10% of the planned bytes."""
    out = run / "afm6"
    assert compress(run, out, "--ratio", "6", "--serve-device", "cpu") == 0
    plan = json.loads((out / "model.json").read_text())["plan"]
    assert plan["table_format"] in ("fp16", "int8") and 6 / 1.1 <= plan["ratio"] <= 6.6
    tuned = tmp_path / "afm6_ft"
    result = torchrun("finetune", "--model", str(out), "--data", str(run / "data" / "train"),
                      "--batch-size", "256", "--out", str(tuned), "--quiet")
    assert (tuned / "model.json").is_file(), result.stderr[-3000:]
    assert json.loads((tuned / "model.json").read_text())["plan"] == plan
    sizes = {}
    for tables in ("default", "fp32", "fp16", "int8"):
        artifact = tmp_path / f"{tables}.pt"
        options = [] if tables == "default" else ["--tables", tables]
        assert main(["export", "--model", str(tuned), "--device", "cpu", "--out", str(artifact),
                     "--quiet", *options]) == 0
        sizes[tables] = artifact.stat().st_size
    assert sizes["default"] == pytest.approx(sizes[plan["table_format"]], rel=0.01)
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]
    # the tensors the artifact stores are the planned bytes (the rest of the file is
    # TorchScript's code, about 230 KB whatever the model's size)
    with zipfile.ZipFile(tmp_path / "default.pt") as z:
        stored = sum(i.file_size for i in z.infolist() if "/data/" in i.filename)
    assert stored == pytest.approx(plan["served_bytes_after"], rel=0.03)
