"""The CLI end to end on small generated data: every stage, its artifacts, its errors."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from afmrec.launch.cli import main
from afmrec.pipeline.model_io import load_model
from afmrec.pipeline.report import REPORT_COLUMNS, read_report
from afmrec.pipeline.stages import DataRef

pytestmark = pytest.mark.slow

MODEL = ["--embedding-dim", "8", "--over-arch", "16,1", "--deep-arch", "16", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "data"
    argv = ["synth", "--out", str(out), "--rows", "6000", "--test-rows", "2000",
            "--tables", "60,300,20,500", "--dense", "3", "--multi-hot", "2",
            "--missing-rate", "0.2", "--quiet"]
    assert main(argv) == 0
    return out


def _logits(model, data_dir):
    batch = next(iter(DataRef(data_dir / "test").batches(256)))
    model.eval()
    with torch.no_grad():
        return model(batch.dense_features, batch.sparse_features)


@pytest.mark.parametrize("arch", ["dlrm", "deepfm"])
def test_every_stage(data, tmp_path, arch, capsys):
    run = tmp_path / "run"
    train = ["--data", str(data / "train"), "--epochs", "1", "--batch-size", "256"]
    assert main(["train", *train, "--arch", arch, "--out", str(run / "original"), *MODEL]) == 0
    assert main(["stats", "--model", str(run / "original"), "--data", str(data / "train"),
                 "--out", str(run / "stats.pt"), "--quiet"]) == 0
    assert main(["compress", "--model", str(run / "original"), "--stats", str(run / "stats.pt"),
                 "--ratio", "2", "--out", str(run / "afm"), "--quiet"]) == 0
    assert main(["finetune", "--model", str(run / "afm"), *train, "--out", str(run / "afm_ft"),
                 "--quiet", "--eval-at-start"]) == 0
    assert main(["finetune", "--model", str(run / "afm"), "--teacher", str(run / "original"),
                 *train, "--out", str(run / "afm_distill"), "--quiet"]) == 0
    report = run / "report.parquet"
    models = [f"{n}={run / n}" for n in ("original", "afm", "afm_ft", "afm_distill")]
    assert main(["evaluate", "--data", str(data / "test"), "--out", str(report), *models,
                 "--quiet"]) == 0
    rows = read_report(report)
    assert [r["variant"] for r in rows] == ["original", "afm", "afm_ft", "afm_distill"]
    assert set(REPORT_COLUMNS) <= set(rows[0])
    # the target ratio is met in served bytes, within 10%
    assert 2 / 1.1 <= rows[1]["bytes_ratio"] <= 2.2
    assert rows[1]["table_format"] == json.loads((run / "afm" / "model.json").read_text())["plan"]["table_format"]
    assert all(0.5 < r["auc"] <= 1 for r in rows)
    printed = capsys.readouterr().out
    assert "afm_distill" in printed and "ratio" in printed
    ranks = pq.read_table(run / "afm" / "ranks.parquet").to_pylist()
    assert any(r["compressed"] for r in ranks)
    # a saved and reloaded compressed model is the model that compress_ built
    record = json.loads((run / "afm" / "model.json").read_text())
    assert record["ranks"] and record["method"] == "afm"
    reloaded, _ = load_model(run / "afm")
    assert torch.isfinite(_logits(reloaded, data)).all()


def test_errors_are_one_line_and_exit_2(data, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--data", str(data / "train"), "--epochs", "1", "--batch-size", "512"]
    assert main(["train", *common, "--out", str(run / "a"), *MODEL]) == 0
    assert main(["train", *common, "--seed", "1", "--out", str(run / "b"), *MODEL]) == 0
    assert main(["stats", "--model", str(run / "a"), "--data", str(data / "train"),
                 "--out", str(run / "a.pt"), "--quiet"]) == 0
    capsys.readouterr()
    cases = [
        # statistics of model a used for model b
        (["compress", "--model", str(run / "b"), "--stats", str(run / "a.pt"), "--ratio", "2",
          "--out", str(run / "c")], "another model"),
        # an existing output is not replaced
        (["train", *common, "--out", str(run / "a"), *MODEL], "already exists"),
        # an output inside an input
        (["stats", "--model", str(run / "a"), "--data", str(data / "train"),
          "--out", str(run / "a" / "s.pt")], "inside the input"),
        (["evaluate", "--data", str(tmp_path / "nope"), f"a={run / 'a'}"], "not found"),
        (["compress", "--model", str(run / "a"), "--stats", str(run / "a.pt"), "--ratio", "2",
          "--rank-pattern", "nope*=2", "--out", str(run / "c")], "matches no block"),
        (["compress", "--model", str(run / "a"), "--stats", str(run / "a.pt"), "--ratio", "500",
          "--out", str(run / "c")], "unreachable"),
        (["compress", "--model", str(run / "a"), "--stats", str(run / "a.pt"), "--ratio", "2",
          "--dense-ratio", "1000", "--out", str(run / "c")], "dense ratio 1000 is unreachable"),
        (["compress", "--model", str(run / "a"), "--stats", str(run / "a.pt"), "--ratio", "2",
          "--policy", "uniform", "--dense-ratio", "2", "--out", str(run / "c")], "not 'uniform'"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
        assert not (run / "c").exists()


def test_logs_follow_the_current_stderr():
    """The `afmrec` logger writes to `sys.stderr` as it is when a record is emitted: a
    stream replaced (and closed) after logging was set up is never written to again."""
    import io
    import logging
    import sys

    from afmrec.launch.args import setup_logging

    first, second = io.StringIO(), io.StringIO()
    saved = sys.stderr
    try:
        sys.stderr = first
        setup_logging()
        logging.getLogger("afmrec.test").warning("to the first")
        first.close()
        sys.stderr = second
        logging.getLogger("afmrec.test").warning("to the second")
    finally:
        sys.stderr = saved
    assert second.getvalue() == "to the second\n"
